"""Training loaders whose order is a function of (seed, epoch) and that resume in the middle of an epoch.

Epoch e visits the items in ``randperm(n)`` from a generator seeded with (seed, e), whether the run is
fresh or resumed, independent of the global RNG. The loader is *stateful* in Lightning's sense: its
checkpointed state (epoch, batches yielded) makes a resumed run skip, by index, the batches already
trained on. Under DDP, rank r of W takes items r, r + W, … of the epoch's permutation, so step t trains
on the items of step t of a one-process run with batch ``batch_size × W`` (the global batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)

__all__ = ["EpochSampler", "ResumableDataLoader", "make_loader"]

_ORDERS = ("shuffle", "sequential")


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``'s permutation (distinct, reproducible per (seed, epoch))."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1)


def _from_dist(given: int | None, query: Callable[[], int], default: int) -> int:
    """``given`` if set, else ``query()`` of the initialised process group, else ``default`` (no DDP)."""
    if given is not None:
        return int(given)
    return query() if dist.is_available() and dist.is_initialized() else default


class EpochSampler(DistributedSampler):
    """Indices 0..n−1, permuted per epoch from (seed, epoch) (``shuffle=True``) or in order, sharded over
    DDP ranks (padded by repeating the start, like ``DistributedSampler``, when W does not divide n).

    A ``DistributedSampler`` so that Lightning keeps it rather than wrapping it in its own (which would
    re-shuffle); world size and rank are read from ``torch.distributed`` when iterating (or given).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False) -> None:
        # no DistributedSampler.__init__: the process group does not exist yet when loaders are built
        if int(n) < 0:
            raise ValueError(f"n must be ≥ 0, got {n}")
        self.n, self.seed, self.shuffle, self.drop_last = int(n), int(seed), bool(shuffle), bool(drop_last)
        self._replicas, self._rank = num_replicas, rank
        self.epoch = 0

    @property  # type: ignore[override]
    def num_replicas(self) -> int:
        return _from_dist(self._replicas, lambda: dist.get_world_size(), 1)

    @property  # type: ignore[override]
    def rank(self) -> int:
        return _from_dist(self._rank, lambda: dist.get_rank(), 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        """The current epoch's index order over all ranks (before sharding)."""
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __len__(self) -> int:
        w = self.num_replicas
        return self.n // w if self.drop_last else -(-self.n // w)

    def __iter__(self) -> Iterator[int]:
        order, w = self.order(), self.num_replicas
        total = len(self) * w
        if total > len(order) and order:
            order = (order * -(-total // len(order)))[:total]
        return iter(order[self.rank:total:w])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with a (seed, epoch)-determined order that can resume mid-epoch (see module doc).

    ``batch_size`` is per process; ``seed`` seeds the permutations and worker base seeds; ``order`` is
    ``shuffle`` or ``sequential``; ``sampler`` is for Lightning, which passes one when re-creating the
    loader; ``kwargs`` go to ``DataLoader``.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, seed: int = 0, order: str = "shuffle",
                 sampler: Sampler | None = None, **kwargs: Any) -> None:
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        if not isinstance(dataset, Sized):
            raise ValueError("ResumableDataLoader needs a map-style dataset with a length")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: nothing to train on")
        if sampler is None:
            sampler = EpochSampler(len(dataset), seed, shuffle=order == "shuffle")
        kwargs.pop("shuffle", None)  # Lightning passes shuffle=False with its own sampler
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))  # never the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed, self.order = int(seed), order
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    # -- Lightning's stateful-loader protocol -------------------------------------------------------
    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "length"}``: where the loader stands in which epoch (in checkpoints)."""
        return {"epoch": self._epoch(), "batches": int(self._yielded), "length": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next pass over epoch ``state["epoch"]`` skips its first ``state["batches"]``."""
        length, batches = int(state.get("length", -1)), int(state.get("batches", 0))
        if length != len(self):
            log.warning("the checkpoint's training loader had %d batches, this one has %d: not skipping any "
                        "(the data or batch size changed)", length, len(self))
            return
        epoch = int(state.get("epoch", 0))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)  # Lightning creates the first iterator before its set_epoch call
        self._resume = {"epoch": epoch, "batches": batches} if 0 < batches < len(self) else None

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _ResumingIterator(self)

    def _inner_iter(self) -> Iterator[Any]:
        """The iterator of one pass, skipping the batches a restored state says were done."""
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self._epoch() else 0
        self._yielded = skip
        if skip == 0:
            return super().__iter__()
        log.info("training loader: resuming epoch %d after %d of %d batches", self._epoch(), skip, len(self))
        remaining = list(self.batch_sampler)[skip:]  # indices only: nothing is loaded for skipped batches
        return iter(DataLoader(self.dataset, batch_sampler=remaining, num_workers=self.num_workers,
                               collate_fn=self.collate_fn, pin_memory=self.pin_memory, timeout=self.timeout,
                               worker_init_fn=self.worker_init_fn,
                               multiprocessing_context=self.multiprocessing_context, generator=self.generator,
                               prefetch_factor=self.prefetch_factor, persistent_workers=False))


class _ResumingIterator:
    """Counts the batches of one pass (for ``state_dict``); built lazily so ``set_epoch`` applies first."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator[Any] | None = None

    def __iter__(self) -> _ResumingIterator:
        return self

    def __next__(self) -> Any:
        if self.inner is None:
            self.inner = self.loader._inner_iter()
        batch = next(self.inner)
        self.loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(dataset: Dataset, shuffle: bool, *, batch_size: int, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A :class:`ResumableDataLoader` when ``shuffle``, else a fixed-order ``DataLoader`` (what
    datamodules hand out); workers persist across epochs when there are any."""
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                              "persistent_workers": num_workers > 0, "pin_memory": pin_memory}
    if shuffle:
        return ResumableDataLoader(dataset, seed=seed, order="shuffle", **common)
    return DataLoader(dataset, shuffle=False, **common)
