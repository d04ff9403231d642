"""State-target cache: cold-LCA states u* of a dataset split, computed once, on disk, resumable.

WARP-CNN regresses the states of cold-started LCA after ``target_iters`` steps; these are expensive, so
they are computed once into a directory (format and reader: :mod:`warplca.data.target_store`; the builder,
a LightningModule: :mod:`warplca.modules.target_builder`). Here: the (image, state) dataset and
datamodule WARP-CNN trains on, and the reader's names.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from warplca.data import target_store as store
from warplca.data.resumable import make_loader
from warplca.data.target_store import (
    FORMAT,
    TargetCache,
    TargetCacheIncompleteError,
    TargetCacheMismatchError,
    data_fingerprint,
    expected_manifest,
    manifest_diff,
    target_manifest,
)

__all__ = ["FORMAT", "TargetCache", "TargetCacheIncompleteError", "TargetCacheMismatchError",
           "TargetDataModule", "TargetDataset", "data_fingerprint", "expected_manifest", "manifest_diff",
           "target_manifest"]


def __getattr__(name: str) -> Any:
    """Names that moved to :mod:`warplca.data.target_store` (``normalize_solver``, ``MANIFEST``, …)."""
    return getattr(store, name)


class TargetDataset(Dataset):
    """(image in [0, 1], target states) pairs: images from the deterministic split, states read lazily
    from the cache (one ``pread`` per item; nothing is loaded up front)."""

    def __init__(self, cache: TargetCache, images: Dataset, return_index: bool = False) -> None:
        if len(images) < cache.count:  # type: ignore[arg-type]
            raise ValueError(f"{cache.directory}: the cache has {cache.count} rows but the image dataset "
                             f"only {len(images)} items")  # type: ignore[arg-type]
        shape = tuple(store.item_image(images[0]).shape)
        if list(shape) != list(cache.manifest["image_shape"]):
            raise ValueError(f"{cache.directory}: cached states belong to images "
                             f"{cache.manifest['image_shape']}, the dataset yields {list(shape)}")
        self.cache, self.images, self.return_index = cache, images, return_index

    def __len__(self) -> int:
        return self.cache.count

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        pair = (store.item_image(self.images[i]), self.cache.read(i))
        return (*pair, torch.tensor(i)) if self.return_index else pair


class TargetDataModule(pl.LightningDataModule):
    """Loaders of (image, state) pairs for WARP-CNN regression: shuffled (seeded) train, fixed val."""

    def __init__(self, train: TargetDataset, val: TargetDataset | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.seed, self.pin_memory = int(seed), bool(pin_memory)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        # shuffled: order = f(seed, epoch), resumable mid-epoch, sharded like one big batch under DDP
        return make_loader(ds, shuffle, batch_size=self.batch_size, seed=self.seed,
                           num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)
