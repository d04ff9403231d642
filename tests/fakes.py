"""Tiny on-disk datasets in the published file formats, and a guard that makes any download attempt fail.

Each ``make_*`` writes a few images into ``root`` exactly where the real dataset's files live, with
per-image content the tests can recognise after loading (``cifar_image``, ``stl_image``, ``pets_item``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.oxford_iiit_pet
import torchvision.datasets.stl10
import torchvision.datasets.utils
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every torchvision download entry point raise: a test that reaches one would use the network."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"torchvision tried to download {args[:1]} during a test")

    datasets = torchvision.datasets
    for module in (datasets.cifar, datasets.stl10, datasets.oxford_iiit_pet, datasets.utils):
        monkeypatch.setattr(module, "download_and_extract_archive", forbidden)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", forbidden)


def as_item(image: np.ndarray) -> torch.Tensor:
    """A uint8 (C, H, W) fake image as the datamodules must yield it: float32 in [0, 1]."""
    return torch.from_numpy(image).to(torch.float32) / 255.0


# -- CIFAR-10: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, python pickles ------------


def cifar_image(i: int) -> np.ndarray:
    """Image ``i`` (0 <= i <= 235) of the fake, (3, 32, 32) uint8: channel c is filled with 10c + i, and
    pixel (row 0, column 5) of channel 0 is 255 (a transposed read moves it)."""
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        img[c] = 10 * c + i
    img[0, 0, 5] = 255
    return img


def cifar_label(i: int) -> int:
    """The class of fake CIFAR image ``i``."""
    return i % 10


def make_cifar10(root: Path, per_batch: int = 10) -> Path:
    """``root/cifar-10-batches-py`` as the python release lays it out: five training batches and a test
    batch (dicts with ``data`` (N, 3072) uint8 rows in channel-major order and ``labels``) and
    ``batches.meta``. Training images are 0 .. 5·per_batch-1, the test batch holds the next ``per_batch``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        ids = range(b * per_batch, (b + 1) * per_batch)
        entry = {
            "batch_label": f"fake batch {b + 1}",
            "labels": [cifar_label(i) for i in ids],
            "data": np.stack([cifar_image(i).reshape(-1) for i in ids]),
            "filenames": [f"img_{i}.png" for i in ids],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072}, fh,
                    protocol=2)
    return root


# -- STL-10: stl10_binary/{train,test}_{X,y}.bin, class_names.txt, fold_indices.txt ----------------------


def stl_image(i: int) -> np.ndarray:
    """Image ``i`` (< 256) of a fake STL-10 part, (3, 96, 96) uint8 in (C, H, W): channel 1 is 100,
    channel 2 is i, channel 0 is 0 except pixel (row 0, column 7) = 255."""
    img = np.zeros((3, 96, 96), dtype=np.uint8)
    img[1] = 100
    img[2] = i
    img[0, 0, 7] = 255
    return img


def stl_label(i: int) -> int:
    """The (0-based) class of image ``i`` of a fake STL-10 part (the file stores it + 1)."""
    return i % 10


def make_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """``root/stl10_binary`` as the binary release lays it out: ``*_X.bin`` raw uint8 images, each channel
    stored column-major, ``*_y.bin`` one byte per image holding class 1..10, ``class_names.txt`` and
    ``fold_indices.txt`` (10 lines of training indices). ``unlabeled_X.bin`` is left out: it is not read."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for part, n in (("train", n_train), ("test", n_test)):
        images = np.stack([stl_image(i) for i in range(n)])
        images.transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # (N, C, W, H) in C order
        np.array([stl_label(i) + 1 for i in range(n)], dtype=np.uint8).tofile(folder / f"{part}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    folds = [" ".join(str(j) for j in range(f, n_train, 10)) for f in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    return root


# -- Oxford-IIIT Pets: oxford-iiit-pet/images/*.jpg, annotations/{trainval,test}.txt ---------------------

#: (breed, CLASS-ID, SPECIES, BREED ID) as in the real annotation files
PET_BREEDS = [("Abyssinian", 1, 1, 1), ("american_bulldog", 2, 2, 1), ("american_pit_bull_terrier", 3, 2, 2)]
PET_CLASSES = ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]


def make_pets(root: Path, per_breed: int = 6) -> Path:
    """``root/oxford-iiit-pet`` as torchvision lays it out: JPEGs of assorted sizes (noise, one greyscale
    per breed, as the real set holds a few) and annotation lines ``<image id> <class> <species> <breed>``;
    the last two images of each breed are in ``test.txt``, the others in ``trainval.txt``."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"trainval.txt": [], "test.txt": []}
    for breed, class_id, species, breed_id in PET_BREEDS:
        for k in range(1, per_breed + 1):
            image_id = f"{breed}_{k}"
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            if k == 1:
                img = img.convert("L")
            img.save(base / "images" / f"{image_id}.jpg")
            target = "test.txt" if k > per_breed - 2 else "trainval.txt"
            lines[target].append(f"{image_id} {class_id} {species} {breed_id}")
    for name, rows in lines.items():
        (base / "annotations" / name).write_text("\n".join(rows) + "\n")
    return root


def pets_list(root: Path, list_name: str) -> list[tuple[Path, int]]:
    """(image path, 0-based class) of every line of ``annotations/<list_name>``, in file order."""
    base = root / "oxford-iiit-pet"
    rows = [line.split() for line in (base / "annotations" / list_name).read_text().splitlines() if line]
    return [(base / "images" / f"{row[0]}.jpg", int(row[1]) - 1) for row in rows]


def pets_item(path: Path, image_size: int) -> torch.Tensor:
    """The expected item for a JPEG, computed with PIL alone: decode to RGB, bilinear-resize the shorter
    side to ``image_size`` (longer side truncated), keep the centred square, scale to [0, 1], (C, H, W)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    new = (image_size, int(image_size * h / w)) if w <= h else (int(image_size * w / h), image_size)
    if new != (w, h):
        rgb = rgb.resize(new, Image.BILINEAR)
    left, top = round((new[0] - image_size) / 2), round((new[1] - image_size) / 2)
    square = np.asarray(rgb.crop((left, top, left + image_size, top + image_size)))
    return torch.from_numpy(square.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


# -- ImageFolder tree ---------------------------------------------------------------------------------


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4,
                test: bool = True) -> Path:
    """An ImageFolder tree of 16x16 PNGs: train/<class>/, val/<class>/ and optionally test/<class>/;
    image k of class c is filled with 40c + k."""
    splits = ("train", "val", "test") if test else ("train", "val")
    for split in splits:
        for c_idx, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                img = Image.fromarray(np.full((16, 16, 3), 40 * c_idx + k, dtype=np.uint8))
                img.save(d / f"{cls}_{k}.png")
    return root
