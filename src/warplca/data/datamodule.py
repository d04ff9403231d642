"""The common LightningDataModule base and the small dataset helpers every datamodule shares.

Batches are ``(images, labels)``: float32 ``(B, C, H, W)`` in [0, 1] and int64 labels (-1: unlabelled).
``split_dataset(split)`` is deterministic; only ``train_dataloader`` augments and shuffles (seeded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from warplca.data.normalization import Normalization
from warplca.data.resumable import make_loader

__all__ = ["SPLITS", "ArrayImageDataset", "DatasetNotFoundError", "FlipRotateDataset", "ImageDataModule",
           "RandomCropDataset", "check_files", "luminance", "stratified_order", "stratified_split"]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# ITU-R BT.601 luma weights, the same ones PIL's "L" mode uses.
_LUMA = (0.299, 0.587, 0.114)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing and downloading was not requested."""


def check_files(directory: str | Path, expected: Sequence[str], dataset: str,
                hint: str | None = None) -> None:
    """Raise :class:`DatasetNotFoundError`, naming the directory and the expected and missing entries and
    how to fix it (``hint``), unless every path in ``expected`` exists under ``directory``."""
    root = Path(directory).expanduser()
    missing = [name for name in expected if not (root / name).exists()]
    if not missing:
        return
    how = hint or "pass data.download=true to fetch it, or set data.data_dir to the folder that holds it"
    raise DatasetNotFoundError(
        f"{dataset}: dataset files not found in directory '{root.resolve()}'. "
        f"Expected: {', '.join(expected)}. Missing: {', '.join(missing)}. Either {how}."
    )


def luminance(images: Tensor) -> Tensor:
    """RGB -> one luminance channel (BT.601 weights) for ``(..., 3, H, W)``; 1 channel passes through."""
    if images.shape[-3] == 1:
        return images
    if images.shape[-3] != 3:
        raise ValueError(f"luminance expects 1 or 3 channels, got {images.shape[-3]}")
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(dim=-3, keepdim=True)


def stratified_order(labels: Sequence[int] | Tensor | np.ndarray, seed: int) -> Tensor:
    """A seeded order of all items in which every prefix holds each class within one item of its share:
    the first n items are a sample stratified by class, and a larger n contains every smaller one.

    Each class is shuffled with ``torch.Generator().manual_seed(seed)`` and its items get evenly spaced
    keys ``(rank + 0.5) / class_size``; all items are then ordered by key (random tie-break).
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
    gen = torch.Generator().manual_seed(int(seed))
    n = len(y)
    keys = torch.empty(n, dtype=torch.float64)
    for cls in torch.unique(y).tolist():
        idx = torch.nonzero(y == cls).flatten()
        ranks = torch.randperm(len(idx), generator=gen).to(torch.float64)
        keys[idx] = (ranks + 0.5) / len(idx)
    order = torch.randperm(n, generator=gen)  # random tie-break, kept by the stable sort below
    return order[torch.sort(keys[order], stable=True)[1]]


def stratified_split(labels: Sequence[int] | Tensor | np.ndarray, fractions: Sequence[float],
                     seed: int) -> list[Tensor]:
    """Split indices into ``len(fractions)`` disjoint parts with the class proportions of the whole: the
    :func:`stratified_order` cut at ``round(cumulative_fraction * N)``. Part sizes are exact and every
    class lands in each part within one item of its share, even when classes are tiny. The returned index
    tensors are sorted."""
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    order = stratified_order(labels, seed)
    n = len(order)
    cuts = [round(c * n) for c in np.cumsum([0.0, *fr])]
    return [torch.sort(order[a:b])[0] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class ArrayImageDataset(Dataset):
    """uint8 (or float [0, 1]) images ``(N, C, H, W)``, array or memmap, + int labels -> float [0, 1] items.

    Images stay uint8 (4x less memory) and are converted per item; ``indices`` selects a subset without
    copying the array.
    """

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor | Sequence[int],
                 indices: Tensor | Sequence[int] | None = None, grayscale: bool = False) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.labels) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(self.labels)} labels")
        self.indices = (
            torch.arange(images.shape[0]) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        )
        self.grayscale = grayscale
        if len(self.indices) and (images.dtype.kind == "f" if isinstance(images, np.ndarray)
                                  else isinstance(images, Tensor) and images.is_floating_point()):
            lo, hi = float(images.min()), float(images.max())  # uint8 is [0, 255] -> [0, 1] by construction
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
                raise ValueError(f"float images must be finite and in [0, 1], got values in "
                                 f"[{lo:.4g}, {hi:.4g}] (pass uint8 images, or divide by 255)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = int(self.indices[i])
        img = torch.from_numpy(np.array(self.images[j]))  # copy: memmaps are read-only
        x = img.to(torch.float32) / 255.0 if img.dtype == torch.uint8 else img.to(torch.float32)
        if self.grayscale:
            x = luminance(x)
        return x, int(self.labels[j])


class RandomCropDataset(Dataset):
    """Training augmentation: a uniformly random ``crop_size`` crop of each item.

    Uses the global torch RNG, which ``seed_everything`` and DataLoader worker seeding make reproducible.
    """

    def __init__(self, base: Dataset, crop_size: int) -> None:
        self.base, self.crop_size = base, int(crop_size)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        h, w = x.shape[-2:]
        c = self.crop_size
        if c > h or c > w:
            raise ValueError(f"crop_size={c} is larger than the image ({h}x{w})")
        top = int(torch.randint(0, h - c + 1, ()).item())
        left = int(torch.randint(0, w - c + 1, ()).item())
        return x[..., top : top + c, left : left + c], y


class FlipRotateDataset(Dataset):
    """Training augmentation: random horizontal flip and/or rotation by k·90° (square items; global RNG)."""

    def __init__(self, base: Dataset, flip: bool = True, rot90: bool = True) -> None:
        self.base, self.flip, self.rot90 = base, bool(flip), bool(rot90)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        if self.flip and bool(torch.randint(0, 2, ()).item()):
            x = x.flip(-1)
        if self.rot90 and x.shape[-1] == x.shape[-2]:
            x = torch.rot90(x, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))
        return x.contiguous(), y


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ImageDataModule(pl.LightningDataModule):
    """Base class: seeded loaders, deterministic splits, train-fitted normalisation, whole-split tensors.

    Subclasses set ``name``, ``num_classes`` and ``native_channels`` and implement :meth:`_build_split`.
    ``crop_size`` is a random crop of the training loader only (unless ``crop_is_augmentation`` is False).
    """

    name: str = "images"
    num_classes: int | None = None
    native_channels: int = 3
    #: whether ``crop_size`` is a train-only random-crop augmentation (False: subclass uses it itself)
    crop_is_augmentation: bool = True

    def __init__(self, batch_size: int = 64, num_workers: int = 0, grayscale: bool = False,
                 crop_size: int | None = None, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.crop_size = None if crop_size is None else _check_int("crop_size", crop_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.grayscale, self.pin_memory = bool(grayscale), bool(pin_memory)
        self._norm_options: dict[str, Any] = {}
        self._splits: dict[str, Dataset] = {}
        self._normalization: Normalization | None = None

    # ---- what subclasses provide -------------------------------------------------------------------
    def _build_split(self, split: str) -> Dataset:
        """The deterministic dataset of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """Channels of the images the loaders yield (1 when ``grayscale``)."""
        return 1 if self.grayscale else self.native_channels

    # ---- splits ------------------------------------------------------------------------------------
    def split_dataset(self, split: str) -> Dataset:
        """The deterministic dataset of ``split`` ("train", "val" or "test"), built once and cached."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if split not in self._splits:
            ds = self._build_split(split)
            if len(ds) == 0:  # type: ignore[arg-type]
                raise ValueError(f"dataset '{self.name}': split '{split}' is empty")
            self._splits[split] = ds
            log.debug("%s: %s split has %d images", self.name, split, len(ds))  # type: ignore[arg-type]
        return self._splits[split]

    def setup(self, stage: str | None = None) -> None:
        """Build (and validate) the splits the given Lightning stage needs."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("train",)}
        for split in needed.get(stage or "", SPLITS):
            self.split_dataset(split)

    # ---- loaders -----------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # shuffled: order = f(seed, epoch), resumable mid-epoch from a checkpoint (see warplca.data.resumable)
        return make_loader(dataset, shuffle, batch_size=self.batch_size, seed=self.seed,
                           num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training loader, with the random crop augmentation when ``crop_size`` is set."""
        ds = self.split_dataset("train")
        if self.crop_is_augmentation and self.crop_size is not None:
            ds = RandomCropDataset(ds, self.crop_size)
        return self._loader(ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split_dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split_dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The train split, unshuffled and un-augmented (what state-target caches are built from)."""
        return self._loader(self.split_dataset("train"), shuffle=False)

    # ---- whole-split helpers -----------------------------------------------------------------------
    def tensor(self, split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """The first ``limit`` items (all if None) of ``split`` stacked: images (N, C, H, W), labels (N,)."""
        ds = self.split_dataset(split)
        n = len(ds)  # type: ignore[arg-type]
        if limit is not None:
            n = min(n, _check_int("limit", limit, 1))
        batches = list(DataLoader(Subset(ds, range(n)), batch_size=max(self.batch_size, 256), shuffle=False))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]).to(torch.int64)

    def configure_normalization(self, kind: str = "dataset_mean", **options: Any) -> None:
        """Choose the normalisation (``norm`` config group), validated at once; the train split's channel
        means are computed lazily by :attr:`normalization`."""
        Normalization(mean=(0.0,) * self.channels, kind=kind, **options)  # a bad option fails here
        self._norm_options = {"kind": kind, **options}
        self._normalization = None

    @property
    def normalization(self) -> Normalization:
        """The configured normalisation with the (un-augmented) train split's channel means; computed once."""
        if self._normalization is None:
            loader = DataLoader(self.split_dataset("train"), batch_size=max(self.batch_size, 256))
            sums = [(x.to(torch.float64).sum(dim=(0, 2, 3)), x[:, 0].numel()) for x, _ in loader]
            mean = sum(s for s, _ in sums) / sum(n for _, n in sums)
            self._normalization = Normalization(mean=tuple(mean.tolist()), **self._norm_options)
        return self._normalization

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, channels={self.channels}, "
                f"batch_size={self.batch_size}, crop_size={self.crop_size}, seed={self.seed})")
