"""Data: datamodules (embedded ``natural``/``digits`` and on-disk datasets), normalisation, corruptions.

``build_datamodule("natural", batch_size=32)`` or ``DATAMODULES[name](**kwargs)`` give a
``pytorch_lightning.LightningDataModule`` whose batches are ``(images in [0, 1], int64 labels)``.
"""

from __future__ import annotations

from typing import Any

from warplca.data.corruptions import (
    CORRUPTIONS,
    DEFAULT_LEVELS,
    corrupt,
    gaussian_blur,
    gaussian_noise,
    impulse_noise,
    shot_noise,
)
from warplca.data.datamodule import DatasetNotFoundError, ImageDataModule, luminance, stratified_split
from warplca.data.digits import DigitsDataModule
from warplca.data.natural import NaturalDataModule
from warplca.data.normalization import Normalization
from warplca.data.torchvision_sets import CIFAR10DataModule, FolderDataModule, PetsDataModule, STL10DataModule

__all__ = ["CORRUPTIONS", "DATAMODULES", "DEFAULT_LEVELS", "CIFAR10DataModule", "DatasetNotFoundError",
           "DigitsDataModule", "FolderDataModule", "ImageDataModule", "NaturalDataModule", "Normalization",
           "PetsDataModule", "STL10DataModule", "build_datamodule", "corrupt", "gaussian_blur",
           "gaussian_noise", "impulse_noise", "luminance", "shot_noise", "stratified_split"]

#: datamodule name (the Hydra ``data/`` option) -> class
DATAMODULES: dict[str, type[ImageDataModule]] = {
    cls.name: cls for cls in (NaturalDataModule, DigitsDataModule, CIFAR10DataModule, STL10DataModule,
                              PetsDataModule, FolderDataModule)
}


def build_datamodule(name: str, **kwargs: Any) -> ImageDataModule:
    """Instantiate the datamodule registered as ``name`` with ``kwargs``."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown datamodule {name!r}; known: {sorted(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)
