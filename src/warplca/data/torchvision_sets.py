"""Real datasets on disk: CIFAR-10, STL-10, Oxford-IIIT Pets and any ImageFolder tree (e.g. Tiny ImageNet).

CIFAR-10, STL-10 and Pets are read by torchvision's dataset classes (``CIFAR10``, ``STL10``,
``OxfordIIITPet``) from their published files, so a normal run makes no network call; ``download=True``
fetches missing files through the same classes. Every image goes through :class:`UnitTensor`: float32
``(C, H, W)`` in [0, 1] (luminance when ``grayscale``). Validation splits the datasets do not publish are
carved from the training set by a stratified split seeded with ``split_seed`` (not the training ``seed``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, STL10, OxfordIIITPet

from warplca.data.datamodule import (
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
    "UnitTensor",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnitTensor:
    """PIL image -> float32 ``(C, H, W)`` tensor in [0, 1]: the transform every on-disk dataset applies.

    With ``image_size``, the shorter side is first resized to it (antialiased) and the centre square kept,
    so photos of any shape batch; with ``grayscale``, the RGB result becomes one BT.601 luminance channel
    (computed in float, as for the embedded datasets). A class rather than a closure so loader workers can
    pickle it.
    """

    def __init__(self, image_size: int | None = None, grayscale: bool = False) -> None:
        self.image_size, self.grayscale = image_size, bool(grayscale)

    def __call__(self, img: Image.Image) -> Tensor:
        rgb = img.convert("RGB")
        if self.image_size is not None:
            rgb = TF.center_crop(TF.resize(rgb, self.image_size, antialias=True), [self.image_size] * 2)
        x = TF.pil_to_tensor(rgb).to(torch.float32) / 255.0
        return luminance(x) if self.grayscale else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, grayscale={self.grayscale})"


class ImageFileDataset(Dataset):
    """Image files + labels -> :class:`UnitTensor` items (``image_size``: resize + centre crop)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int | None = None,
                 grayscale: bool = False) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.transform = UnitTensor(image_size, grayscale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.paths[i]) as img:
            x = self.transform(img)
        return x, int(self.labels[i])


# -- torchvision's readers, with an existence-only file check -------------------------------------------
# torchvision's CIFAR10 and STL10 hash (md5) every data file each time they are constructed: about 180 MB
# (CIFAR-10) or 2.6 GB (STL-10, whose check includes the 2.5 GB unlabelled file we never read) per run,
# and tiny files in the same format cannot pass. The subclasses below only require the files they read to
# exist; a download is still verified, since torchvision checks the md5 of the archive it fetches.


class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 whose file check only requires the batch and meta files to exist."""

    # check_integrity(path, md5=None) is "the file exists"
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _STL10Files(STL10):
    """torchvision's STL10 whose file check only requires the labelled ``{train,test}_{X,y}.bin`` to exist."""

    labelled = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / name).is_file() for name in self.labelled)


class _DiskDataModule(ImageDataModule):
    """Shared plumbing: ``data_dir``, ``download``, the file check and the carved validation split."""

    #: paths, relative to ``data_dir``, that must exist for the dataset to load
    expected: tuple[str, ...] = ()
    #: how to fix missing files, for the error message (None: download or set data_dir)
    hint: str | None = None
    #: the published part that train and val are carved from
    train_part = "train"

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
        self._train_source: Dataset | None = None

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

    def _carve(self, labels: Tensor | np.ndarray | Sequence[int], split: str) -> Tensor:
        """Indices of the published train set that form our ``split`` ("train" or "val")."""
        train, val = stratified_split(labels, (1.0 - self.val_fraction, self.val_fraction), self.split_seed)
        return train if split == "train" else val

    # -- the torchvision datasets --------------------------------------------------------------------
    def _open(self, part: str) -> Dataset:
        """torchvision's dataset of the published ``part`` (``train_part`` or "test"), items through
        :class:`UnitTensor`."""
        raise NotImplementedError

    @staticmethod
    def _labels(dataset: Dataset) -> Sequence[int] | np.ndarray:
        """The class ids of every item of a dataset returned by :meth:`_open`, without reading images."""
        raise NotImplementedError

    def _build_split(self, split: str) -> Dataset:
        self._ensure_files()
        if split == "test":
            return self._open("test")
        if self._train_source is None:  # train and val are both carved from it: read it once
            self._train_source = self._open(self.train_part)
        return Subset(self._train_source, self._carve(self._labels(self._train_source), split).tolist())


class CIFAR10DataModule(_DiskDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) from ``<data_dir>/cifar-10-batches-py`` (the python pickles)."""

    name = "cifar10"
    num_classes = 10
    folder = CIFAR10.base_folder
    expected = tuple(f"{CIFAR10.base_folder}/{f}"
                     for f in (*(n for n, _ in CIFAR10.train_list), *(n for n, _ in CIFAR10.test_list),
                               CIFAR10.meta["filename"]))

    def _fetch(self) -> None:
        _CIFAR10Files(str(self.data_dir), train=True, download=True)

    def _open(self, part: str) -> Dataset:
        return _CIFAR10Files(str(self.data_dir), train=part == "train",
                             transform=UnitTensor(None, self.grayscale))

    @staticmethod
    def _labels(dataset: Dataset) -> Sequence[int]:
        return dataset.targets  # type: ignore[attr-defined]


class STL10DataModule(_DiskDataModule):
    """STL-10 labelled images (96x96 RGB, 10 classes) from ``<data_dir>/stl10_binary``."""

    name = "stl10"
    num_classes = 10
    folder = STL10.base_folder
    expected = tuple(f"{STL10.base_folder}/{f}" for f in _STL10Files.labelled)

    def _fetch(self) -> None:
        _STL10Files(str(self.data_dir), split="train", download=True)

    def _open(self, part: str) -> Dataset:
        base = self.data_dir / self.folder
        n_labels = (base / f"{part}_y.bin").stat().st_size  # one uint8 label per image
        n_bytes = (base / f"{part}_X.bin").stat().st_size
        if n_bytes != n_labels * 3 * 96 * 96:
            raise ValueError(
                f"stl10: {base / (part + '_X.bin')} holds {n_bytes} bytes, expected "
                f"{n_labels} images x 3x96x96 = {n_labels * 3 * 96 * 96} (corrupt or truncated file?)"
            )
        return _STL10Files(str(self.data_dir), split=part, transform=UnitTensor(None, self.grayscale))

    @staticmethod
    def _labels(dataset: Dataset) -> np.ndarray:
        return dataset.labels  # type: ignore[attr-defined]


class _PetsFiles(OxfordIIITPet):
    """torchvision's OxfordIIITPet with the category ids exposed (torchvision keeps them in ``_labels``)."""

    @property
    def labels(self) -> list[int]:
        return list(self._labels)


class PetsDataModule(_DiskDataModule):
    """Oxford-IIIT Pets (37 breeds), resized + centre-cropped to ``image_size``; val is carved from trainval.

    Reads ``<data_dir>/oxford-iiit-pet/{images, annotations}``, the layout torchvision's OxfordIIITPet
    reads and downloads into.
    """

    name = "pets"
    num_classes = 37
    folder = "oxford-iiit-pet"
    expected = tuple(f"oxford-iiit-pet/{p}" for p in ("images", "annotations/trainval.txt",
                                                      "annotations/test.txt"))
    train_part = "trainval"

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
    def hint(self) -> str | None:  # type: ignore[override]
        """Point at the sub-folder when the two folders were unpacked directly into ``data_dir``."""
        if (self.data_dir / "annotations").is_dir() and not (self.data_dir / self.folder).exists():
            return (f"move images/ and annotations/ from '{self.data_dir}' into its {self.folder}/ "
                    "sub-folder (the layout torchvision's OxfordIIITPet reads), or pass data.download=true")
        return None

    def _fetch(self) -> None:
        _PetsFiles(str(self.data_dir), split="trainval", download=True)

    def _open(self, part: str) -> Dataset:
        dataset = _PetsFiles(str(self.data_dir), split=part,
                             transform=UnitTensor(self.image_size, self.grayscale))
        if not self.classes:
            self.classes = list(dataset.classes)
        return dataset

    @staticmethod
    def _labels(dataset: Dataset) -> list[int]:
        return dataset.labels  # type: ignore[attr-defined]


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
