"""Real datasets on disk: CIFAR-10, STL-10, Oxford-IIIT Pets and any ImageFolder tree (e.g. Tiny ImageNet).

Files are read directly in their published formats, so a normal run makes no network call; torchvision
only downloads (``download=True``, files missing). Validation splits the datasets do not publish are
carved from the training set by a stratified split seeded with ``split_seed`` (not the training ``seed``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from warplca.data.datamodule import (
    ArrayImageDataset,
    DatasetNotFoundError,
    ImageDataModule,
    _check_int,
    check_files,
    luminance,
    stratified_split,
)

__all__ = [
    "CIFAR10DataModule",
    "FolderDataModule",
    "ImageFileDataset",
    "PetsDataModule",
    "STL10DataModule",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFileDataset(Dataset):
    """Image files + labels -> float [0, 1] RGB (or luminance) tensors; with ``image_size``, the shorter
    side is resized to it (antialiased) and the centre square kept, so photos of any shape batch."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int | None = None,
                 grayscale: bool = False) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.image_size, self.grayscale = image_size, grayscale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        import torchvision.transforms.functional as TF

        with Image.open(self.paths[i]) as img:
            rgb = img.convert("RGB")
        if self.image_size is not None:
            rgb = TF.center_crop(TF.resize(rgb, self.image_size, antialias=True), [self.image_size] * 2)
        x = TF.pil_to_tensor(rgb).to(torch.float32) / 255.0
        if self.grayscale:
            x = luminance(x)
        return x, int(self.labels[i])


class _DiskDataModule(ImageDataModule):
    """Shared plumbing: ``data_dir``, ``download``, the file check and the carved validation split."""

    #: paths, relative to ``data_dir``, that must exist for the dataset to load
    expected: tuple[str, ...] = ()
    #: how to fix missing files, for the error message (None: download or set data_dir)
    hint: str | None = None

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64,
                 num_workers: int = 0, grayscale: bool = False, crop_size: int | None = None, seed: int = 0,
                 val_fraction: float = 0.1, split_seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, grayscale=grayscale,
                         crop_size=crop_size, seed=seed, pin_memory=pin_memory)
        self.data_dir = Path(data_dir).expanduser()
        self.download = bool(download)
        if not (0.0 < float(val_fraction) < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.split_seed = _check_int("split_seed", split_seed, 0)

    # -- files ---------------------------------------------------------------------------------------
    def _missing(self) -> bool:
        return any(not (self.data_dir / p).exists() for p in self.expected)

    def _fetch(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download (Lightning calls this on one process only) when asked to and the files are missing."""
        if self.download and self._missing():
            log.info("%s: downloading into %s", self.name, self.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._fetch()

    def _ensure_files(self) -> None:
        self.prepare_data()
        check_files(self.data_dir, self.expected, self.name, self.hint)

    def _carve(self, labels: Tensor | np.ndarray, split: str) -> Tensor:
        """Indices of the published train set that form our ``split`` ("train" or "val")."""
        train, val = stratified_split(labels, (1.0 - self.val_fraction, self.val_fraction), self.split_seed)
        return train if split == "train" else val

    # -- array datasets (CIFAR-10, STL-10); the file datasets override _build_split -----------------
    def _arrays(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``(N, C, H, W)`` and int64 labels of the published ``part`` ("train" or "test")."""
        raise NotImplementedError

    def _build_split(self, split: str) -> Dataset:
        self._ensure_files()
        if split == "test":
            x, y = self._arrays("test")
            return ArrayImageDataset(x, y, grayscale=self.grayscale)
        if not hasattr(self, "_train_arrays"):  # train and val are both carved from it: read it once
            self._train_arrays = self._arrays("train")
        x, y = self._train_arrays
        return ArrayImageDataset(x, y, indices=self._carve(y, split), grayscale=self.grayscale)


class CIFAR10DataModule(_DiskDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) from ``<data_dir>/cifar-10-batches-py`` (the python pickles)."""

    name = "cifar10"
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    expected = tuple(f"cifar-10-batches-py/{f}" for f in (*train_files, *test_files))

    def _fetch(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.data_dir), train=True, download=True)

    def _arrays(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for f in self.train_files if part == "train" else self.test_files:
            with open(self.data_dir / self.folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"]))
        return np.concatenate(images), np.concatenate(labels).astype(np.int64)


class STL10DataModule(_DiskDataModule):
    """STL-10 labelled images (96x96 RGB, 10 classes) from ``<data_dir>/stl10_binary`` (memory-mapped)."""

    name = "stl10"
    num_classes = 10
    folder = "stl10_binary"
    expected = tuple(f"stl10_binary/{f}" for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"))

    def _fetch(self) -> None:
        from torchvision.datasets import STL10

        STL10(str(self.data_dir), split="train", download=True)

    def _arrays(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        base = self.data_dir / self.folder
        labels = np.fromfile(base / f"{prefix}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        raw = np.memmap(base / f"{prefix}_X.bin", dtype=np.uint8, mode="r")
        if raw.size != labels.size * 3 * 96 * 96:
            raise ValueError(
                f"stl10: {base / (prefix + '_X.bin')} holds {raw.size} bytes, expected "
                f"{labels.size} images x 3x96x96 = {labels.size * 3 * 96 * 96} (corrupt or truncated file?)"
            )
        # the binaries are column-major per channel: (N, C, W, H) -> (N, C, H, W)
        return raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), labels


class PetsDataModule(_DiskDataModule):
    """Oxford-IIIT Pets (37 breeds), resized + centre-cropped to ``image_size``; val is carved from trainval.

    Reads ``oxford-iiit-pet/{images, annotations}`` (torchvision's layout) or the two folders directly
    under ``data_dir``.
    """

    name = "pets"
    num_classes = 37
    folder = "oxford-iiit-pet"

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64,
                 num_workers: int = 0, grayscale: bool = False, crop_size: int | None = None, seed: int = 0,
                 val_fraction: float = 0.1, split_seed: int = 0, pin_memory: bool = False,
                 image_size: int = 64) -> None:
        super().__init__(data_dir=data_dir, download=download, batch_size=batch_size, num_workers=num_workers,
                         grayscale=grayscale, crop_size=crop_size, seed=seed, val_fraction=val_fraction,
                         split_seed=split_seed, pin_memory=pin_memory)
        self.image_size = _check_int("image_size", image_size, 1)
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise ValueError(f"crop_size={self.crop_size} exceeds image_size={self.image_size}")
        self.classes: list[str] = []

    @property
    def base(self) -> Path:
        """The folder holding ``images/`` and ``annotations/``."""
        nested = self.data_dir / self.folder
        if not nested.exists() and (self.data_dir / "annotations").exists():
            return self.data_dir
        return nested

    @property
    def expected(self) -> tuple[str, ...]:  # type: ignore[override]
        rel = "" if self.base == self.data_dir else f"{self.folder}/"
        return tuple(f"{rel}{p}" for p in ("images", "annotations/trainval.txt", "annotations/test.txt"))

    def _fetch(self) -> None:
        from torchvision.datasets import OxfordIIITPet

        OxfordIIITPet(str(self.data_dir), split="trainval", download=True)

    def _read(self, list_name: str) -> tuple[list[Path], list[int]]:
        paths, labels, names = [], [], {}
        for line in (self.base / "annotations" / list_name).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            image_id, class_id, *_ = line.split()
            label = int(class_id) - 1
            paths.append(self.base / "images" / f"{image_id}.jpg")
            labels.append(label)
            names[label] = " ".join(w.title() for w in image_id.rsplit("_", 1)[0].split("_"))
        if names and not self.classes:
            self.classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
        return paths, labels

    def _build_split(self, split: str) -> Dataset:
        self._ensure_files()
        if split == "test":
            paths, labels = self._read("test.txt")
        else:
            all_paths, all_labels = self._read("trainval.txt")
            idx = self._carve(np.asarray(all_labels), split).tolist()
            paths, labels = [all_paths[i] for i in idx], [all_labels[i] for i in idx]
        return ImageFileDataset(paths, labels, image_size=self.image_size, grayscale=self.grayscale)


class FolderDataModule(_DiskDataModule):
    """Any ImageFolder root: ``train/<class>/**/img``, ``val/...`` and optional ``test/...``.

    Not downloadable. Label ids are the sorted class folders of ``train/``. A split folder may also be
    ``images/`` + ``*annotations.txt`` (Tiny ImageNet's val: ``file<TAB>class ...``) or ``images/`` alone
    (labels -1). Without ``test/``, val doubles as test. ``image_size`` resizes + centre-crops (None:
    images must share one size).
    """

    name = "folder"
    expected = ("train", "val")
    hint = ("set data.data_dir to an ImageFolder root holding train/<class>/*.png and val/<class>/*.png "
            "(test/ optional; folder datasets cannot be downloaded, so data.download=true does not help)")

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64,
                 num_workers: int = 0, grayscale: bool = False, crop_size: int | None = None, seed: int = 0,
                 val_fraction: float = 0.1, split_seed: int = 0, pin_memory: bool = False,
                 image_size: int | None = None) -> None:
        super().__init__(data_dir=data_dir, download=download, batch_size=batch_size, num_workers=num_workers,
                         grayscale=grayscale, crop_size=crop_size, seed=seed, val_fraction=val_fraction,
                         split_seed=split_seed, pin_memory=pin_memory)
        self.image_size = None if image_size is None else _check_int("image_size", image_size, 1)
        self.classes: list[str] = []
        self.num_classes: int | None = None

    def prepare_data(self) -> None:
        """Folder datasets cannot be downloaded: with ``download`` and files missing, say what is needed."""
        if self.download and self._missing():
            raise DatasetNotFoundError(
                f"folder: no ImageFolder tree at '{self.data_dir.resolve()}' and folder datasets cannot be "
                "downloaded; set data.data_dir to a root holding train/<class>/*.png and val/<class>/*.png "
                "(test/ optional)")

    def _ensure_files(self) -> None:
        super()._ensure_files()
        if not self.classes:
            self.classes = sorted(p.name for p in (self.data_dir / "train").iterdir() if p.is_dir())
            if not self.classes:
                raise ValueError(f"folder: '{self.data_dir / 'train'}' has no class sub-folders")
            self.num_classes = len(self.classes)

    @staticmethod
    def _images(directory: Path) -> list[Path]:
        return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())

    def _scan(self, directory: Path) -> tuple[list[Path], list[int]]:
        index = {c: i for i, c in enumerate(self.classes)}
        subdirs = sorted(p.name for p in directory.iterdir() if p.is_dir())
        annotations = sorted(directory.glob("*annotations*.txt"))
        if (directory / "images").is_dir() and "images" not in index:
            images = self._images(directory / "images")
            if not annotations:
                return images, [-1] * len(images)
            rows = (line.split() for line in annotations[0].read_text().splitlines())
            labels_of = {row[0]: row[1] for row in rows if len(row) >= 2}
            unknown = sorted({c for c in labels_of.values() if c not in index})
            if unknown:
                raise ValueError(f"folder: {annotations[0]} names classes not in train/: {unknown[:5]}")
            kept = [p for p in images if p.name in labels_of]
            return kept, [index[labels_of[p.name]] for p in kept]
        unknown = [d for d in subdirs if d not in index]
        if unknown:
            raise ValueError(f"folder: '{directory}' has class folders not present in train/: {unknown[:5]}")
        files = [(path, index[c]) for c in subdirs for path in self._images(directory / c)]
        return [path for path, _ in files], [label for _, label in files]

    def _build_split(self, split: str) -> Dataset:
        self._ensure_files()
        directory = self.data_dir / split
        if split == "test" and not directory.is_dir():
            log.warning("folder: no test/ under '%s'; the val split doubles as the test split", self.data_dir)
            directory = self.data_dir / "val"
        paths, labels = self._scan(directory)
        return ImageFileDataset(paths, labels, image_size=self.image_size, grayscale=self.grayscale)
