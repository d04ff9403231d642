"""Building the state-target cache (:mod:`warplca.data.target_store`): cold-LCA (or λ-continuation)
states of a dataset split, written chunk by chunk through Lightning's predict loop.

A chunk counts only once its marker is renamed into place after its rows are on disk, so a crashed build
resumes (bit-identically on the same device) and an incomplete cache is refused; a cache built with other
settings raises :class:`~warplca.data.target_store.TargetCacheMismatchError`. One chunk per predict step;
each DDP rank writes its own chunks, rank 0 the manifest and ``COMPLETE``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from warplca.coder import SparseCoder, solve_targets
from warplca.data import target_store as store
from warplca.data.normalization import Normalization
from warplca.data.target_store import (
    TargetCache,
    TargetCacheIncompleteError,
    expected_manifest,
)
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA
from warplca.serialization import write_text_atomic

__all__ = ["TargetBuilder", "build_target_cache"]

log = logging.getLogger(__name__)


class _ChunkDataset(Dataset):
    """Item j = (chunk id, images of that chunk's rows) for the chunks still to compute."""

    def __init__(self, dataset: Dataset, chunks: Sequence[int], chunk_size: int, count: int) -> None:
        self.dataset, self.chunks, self.chunk_size, self.count = dataset, list(chunks), chunk_size, count

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> tuple[int, Tensor]:
        i = self.chunks[j]
        start, stop = store.chunk_range(i, self.chunk_size, self.count)
        return i, torch.stack([store.item_image(self.dataset[k]) for k in range(start, stop)])


class TargetBuilder(pl.LightningModule):
    """Computes the target states of ``dataset`` (item i → row i) into ``directory`` (``trainer.predict``).

    One predict step codes one chunk in sub-batches of ``batch_size``, writes and fsyncs its rows, then
    renames its marker into place; finished chunks are skipped, so predicting again resumes a crashed
    build. ``dictionary`` is copied and frozen; ``lca_settings`` is :meth:`LCA.settings` (its ``iters``
    is replaced by the manifest's ``target_iters``). ``overwrite=True`` wipes an existing cache first (a
    mismatching one is refused otherwise).
    """

    def __init__(self, directory: str | os.PathLike, dataset: Dataset, dictionary: ConvDictionary,
                 lca_settings: Mapping[str, Any], manifest: Mapping[str, Any],
                 normalization: Normalization | None = None, batch_size: int = 128, num_workers: int = 0,
                 overwrite: bool = False, fsync: bool = True) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.dataset = dataset
        dictionary = copy.deepcopy(dictionary).requires_grad_(False)
        if dictionary.fingerprint() != manifest["dictionary"]:
            raise ValueError("the manifest describes another dictionary than the one given")
        settings = {k: v for k, v in dict(lca_settings).items() if k != "iters"}
        self.target_iters = int(manifest["target_iters"])
        self.coder = SparseCoder(dictionary, LCA(dictionary, iters=self.target_iters, **settings),
                                 normalization)
        self.continuation = store.solver_continuation(manifest.get("solver"))
        self.manifest = store.jsonable(dict(manifest))
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.overwrite, self.fsync = bool(overwrite), bool(fsync)
        self.chunk_size = int(self.manifest["chunk_size"])
        self.count = int(self.manifest["count"])
        self.remaining: list[int] = []
        self.computed: list[int] = []  # chunks this process computed (tests count them)
        self._rows: store.RowFile | None = None
        if len(dataset) < self.count:  # type: ignore[arg-type]
            raise ValueError(f"the dataset has {len(dataset)} items, the manifest {self.count}")  # type: ignore[arg-type]

    # -- preparation (rank 0 writes, everyone agrees on the chunks left) ------------------------
    def prepare(self) -> list[int]:
        """Create or validate the directory (rank 0's job); returns the chunks still to compute."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        fresh = not self._check_existing()
        if not fresh:
            try:
                TargetCache(d).check_file()
            except ValueError as exc:
                log.warning("%s: %s; recomputing every chunk", d, exc)
                fresh = True
        if fresh:  # wipe, then states first, manifest last (a manifest implies a valid states file)
            for name in (store.MANIFEST, store.STATES, store.COMPLETE):
                (d / name).unlink(missing_ok=True)
            shutil.rmtree(d / store.CHUNKS, ignore_errors=True)
            store.create_npy(d / store.STATES, tuple(self.manifest["shape"]))
            manifest = {**self.manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "tau_resolved": self.coder.lca.resolve_tau(*self.manifest["image_shape"][1:])}
            write_text_atomic(d / store.MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        (d / store.CHUNKS).mkdir(exist_ok=True)
        done = store.done_chunks(d)
        return [i for i in range(int(self.manifest["n_chunks"])) if i not in done]

    def _check_existing(self) -> bool:
        """Whether a cache to keep is there: refuses one built with other settings (unless overwriting)."""
        path = self.directory / store.MANIFEST
        if self.overwrite or not path.is_file():
            return False
        store.check_manifest(self.directory, store.read_json(path), self.manifest)
        return True

    def setup(self, stage: str) -> None:
        self._check_existing()  # every rank refuses a mismatching cache, so none waits forever
        remaining = self.prepare() if self.trainer.is_global_zero else None
        self.remaining = list(self.trainer.strategy.broadcast(remaining, src=0))
        n_chunks = int(self.manifest["n_chunks"])
        if self.trainer.is_global_zero:
            ranges = (store.chunk_range(i, self.chunk_size, self.count) for i in self.remaining)
            log.info("state targets %s [%s]: %d of %d chunks cached; computing %d chunks (%d images × %d "
                     "LCA steps)", self.directory, self.manifest["split"], n_chunks - len(self.remaining),
                     n_chunks, len(self.remaining), sum(b - a for a, b in ranges), self.target_iters)

    def predict_dataloader(self) -> DataLoader:
        ds = _ChunkDataset(self.dataset, self.remaining, self.chunk_size, self.count)
        return DataLoader(ds, batch_size=1, shuffle=False, collate_fn=itemgetter(0),  # one chunk, unbatched
                          num_workers=self.num_workers, persistent_workers=False)

    # -- one chunk ------------------------------------------------------------------------------
    def predict_step(self, batch: tuple[int, Tensor], batch_idx: int) -> int:
        chunk, images = int(batch[0]), batch[1]
        start, stop = store.chunk_range(chunk, self.chunk_size, self.count)
        if images.shape[0] != stop - start:
            raise RuntimeError(f"chunk {chunk}: got {images.shape[0]} images for rows [{start}, {stop})")
        t0 = time.perf_counter()
        states, energy, l0 = solve_targets(self.coder, images, self.target_iters, self.continuation,
                                           self.batch_size)
        rows = states.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._rows is None:
            self._rows = store.RowFile(self.directory / store.STATES, writable=True)
        self._rows.write(start, rows)
        if self.fsync:
            self._rows.sync()
        info = {"chunk": chunk, "start": start, "stop": stop,
                "sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
                "energy_sum": energy, "l0_sum": l0, "seconds": time.perf_counter() - t0}
        write_text_atomic(self.directory / store.CHUNKS / f"{chunk}.done", json.dumps(info))
        self.computed.append(chunk)
        return chunk

    def on_predict_end(self) -> None:
        strategy = self.trainer.strategy
        strategy.barrier("target_cache_done")
        if self.trainer.is_global_zero:
            cache = TargetCache(self.directory)
            if cache.is_complete:
                summary = {**cache.stats(), "n_chunks": cache.n_chunks, "split": self.manifest["split"]}
                write_text_atomic(self.directory / store.COMPLETE, json.dumps(summary, indent=2))
        strategy.barrier("target_cache_complete")
        if self._rows is not None:
            self._rows.close()
            self._rows = None


def build_target_cache(directory: str | os.PathLike, dataset: Dataset, dictionary: ConvDictionary,
                       lca: LCA | Mapping[str, Any], target_iters: int,
                       normalization: Normalization | None = None, *, dataset_name: str = "dataset",
                       split: str = "train", dataset_config: Mapping[str, Any] | None = None,
                       chunk_size: int = 512, batch_size: int = 128, limit: int | None = None,
                       num_workers: int = 0, trainer: pl.Trainer | None = None,
                       overwrite: bool = False, solver: Mapping[str, Any] | str | None = None) -> TargetCache:
    """Build (or resume, or reuse) the state-target cache of ``dataset`` in ``directory``; returns it open.

    ``limit`` caches only the first ``limit`` items. ``trainer`` defaults to a CPU trainer without
    loggers; pass the run's (``ctx.trainer("targets")``) to get its accelerator, devices/DDP and
    progress bar. Raises :class:`TargetCacheMismatchError` when an existing cache differs (unless
    ``overwrite``) and :class:`TargetCacheIncompleteError` when the loop stopped early.
    """
    settings = lca.settings() if isinstance(lca, LCA) else dict(lca)
    manifest = expected_manifest(dataset, dictionary, settings, target_iters, normalization,
                                 dataset_name=dataset_name, split=split, dataset_config=dataset_config,
                                 chunk_size=chunk_size, limit=limit, solver=solver)
    directory = Path(directory)
    if not overwrite:
        try:
            return TargetCache.open(directory, manifest)
        except (FileNotFoundError, TargetCacheIncompleteError):
            pass
    builder = TargetBuilder(directory, dataset, dictionary, settings, manifest, normalization,
                            batch_size=batch_size, num_workers=num_workers, overwrite=overwrite)
    if trainer is None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_model_summary=False)
    trainer.predict(builder, return_predictions=False)
    return TargetCache.open(directory, manifest)
