"""``digits``: scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32 (offline, labelled).

1797 images, values 0..16 scaled to [0, 1], bilinearly upsampled (clamped to [0, 1]) so that the same
dictionary geometry as for 32x32 natural crops applies. A stratified 60/20/20 train/val/test split is
drawn from a seeded permutation (``split_seed``), independent of the training ``seed``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from warplca.data.datamodule import SPLITS, ImageDataModule, _check_int, stratified_split

__all__ = ["DigitsDataModule", "load_digits_tensor"]

log = logging.getLogger(__name__)

_FRACTIONS = (0.6, 0.2, 0.2)


@functools.lru_cache(maxsize=4)
def load_digits_tensor(size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1797 digits as float32 ``(N, 1, size, size)`` in [0, 1] and int64 labels ``(N,)``; cached."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)


class DigitsDataModule(ImageDataModule):
    """The 10-class digits as 32x32 images: 1 channel, or 3 identical channels with ``rgb=True``."""

    name = "digits"
    num_classes = 10
    native_channels = 1

    def __init__(self, batch_size: int = 64, num_workers: int = 0, grayscale: bool = False,
                 crop_size: int | None = None, seed: int = 0, rgb: bool = False, image_size: int = 32,
                 split_seed: int = 0, pin_memory: bool = False) -> None:
        if rgb and grayscale:
            raise ValueError("rgb=True and grayscale=True contradict each other; choose one")
        super().__init__(batch_size=batch_size, num_workers=num_workers, grayscale=grayscale,
                         crop_size=crop_size, seed=seed, pin_memory=pin_memory)
        self.rgb = bool(rgb)
        self.image_size = _check_int("image_size", image_size, 8)
        self.split_seed = _check_int("split_seed", split_seed, 0)
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise ValueError(f"crop_size={self.crop_size} exceeds image_size={self.image_size}")

    @property
    def channels(self) -> int:
        return 3 if self.rgb else 1

    def _build_split(self, split: str) -> Dataset:
        x, y = load_digits_tensor(self.image_size)
        idx = stratified_split(y, _FRACTIONS, self.split_seed)[SPLITS.index(split)]
        images = x[idx]
        if self.rgb:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return TensorDataset(images, y[idx])
