"""Data layer: embedded datamodules, on-disk fakes in the real formats, normalisation, corruptions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.datasets
from fakes import (
    PET_CLASSES,
    as_item,
    cifar_image,
    cifar_label,
    forbid_downloads,
    make_cifar10,
    make_folder,
    make_pets,
    make_stl10,
    pets_item,
    pets_list,
    stl_image,
    stl_label,
)
from omegaconf import OmegaConf
from PIL import Image

from warplca.config import compose_config
from warplca.data import (
    CORRUPTIONS,
    DATAMODULES,
    DEFAULT_LEVELS,
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FolderDataModule,
    ImageDataModule,
    NaturalDataModule,
    Normalization,
    PetsDataModule,
    STL10DataModule,
    build_datamodule,
    corrupt,
    gaussian_blur,
    luminance,
    stratified_split,
)
from warplca.data.natural import DEFAULT_SOURCES, GRAY_SOURCES, load_photo
from warplca.data.normalization import KINDS, tikhonov_lowpass


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def natural() -> NaturalDataModule:
    dm = NaturalDataModule(n_train=64, n_val=16, n_test=16, batch_size=16, flip=False, rot90=False)
    dm.setup()
    return dm


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision reads the fakes; a download attempt would mean network access, so it fails the test."""
    forbid_downloads(monkeypatch)


def _signature(image: torch.Tensor) -> int:
    """The index of a fake CIFAR image, recovered from channel 2 (filled with 20 + i)."""
    return round(float(image[2, 1, 1]) * 255) - 20


def _check_batch(batch: tuple[torch.Tensor, torch.Tensor], channels: int, size: int | None = None) -> None:
    images, labels = batch
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.ndim == 4 and images.shape[1] == channels and labels.shape == (images.shape[0],)
    if size is not None:
        assert images.shape[-2:] == (size, size)
    assert images.min() >= 0.0 and images.max() <= 1.0


# --------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------


def test_normalization_round_trip_and_serialisation() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g)
    norm = Normalization(mean=(0.5, 0.4, 0.3), scale=0.25)
    x = norm.apply(images)
    assert torch.allclose(x[:, 1], (images[:, 1] - 0.4) / 0.25)
    assert torch.allclose(norm.invert(x), images, atol=1e-6)
    assert torch.allclose(norm.invert(norm.apply(images[0])), images[0], atol=1e-6)  # (C, H, W) too
    again = Normalization.from_dict(norm.to_dict())
    assert again == norm and again.to_dict()["mean"] == [0.5, 0.4, 0.3] and again.kind == "dataset_mean"
    # artifacts written before the `kind` key existed read as dataset_mean
    assert Normalization.from_dict({"mean": [0.5, 0.4, 0.3], "scale": 0.25}) == norm
    ident = Normalization.identity(3)
    assert torch.equal(ident.apply(images), images)


@pytest.mark.parametrize("kind", KINDS)
def test_every_normalization_round_trips_exactly(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 32, 24, generator=g, dtype=torch.float64)
    norm = Normalization(mean=(0.5, 0.4, 0.3), scale=0.5, kind=kind)
    x = norm.apply(images)
    assert torch.allclose(norm.invert(x, images), images, atol=1e-12)
    assert torch.allclose(norm.invert(norm.apply(images[0]), images[0]), images[0], atol=1e-12)
    assert Normalization.from_dict(norm.to_dict()) == norm
    # what each kind removes
    if kind == "image_mean":
        assert x.mean(dim=(2, 3)).abs().max() < 1e-12
    if kind == "standardize":
        assert x.mean(dim=(1, 2, 3)).abs().max() < 1e-12
        # unit variance up to eps and scale: σ(x) = σ / ((σ + eps)·scale)
        sigma = images.std(dim=(1, 2, 3), unbiased=False)
        expected = sigma / ((sigma + norm.eps) * norm.scale)
        assert torch.allclose(x.std(dim=(1, 2, 3), unbiased=False), expected, atol=1e-10)
    if kind == "lowpass":
        flat = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
        assert norm.apply(flat).abs().max() < 1e-12  # a constant image is all low-pass
        ramp = torch.linspace(0, 1, 16, dtype=torch.float64).expand(1, 3, 16, 16)
        assert norm.apply(ramp)[..., 4:-4].abs().max() < 0.1  # smooth content stays outside the code
    if norm.per_image:
        with pytest.raises(ValueError, match="per image"):
            norm.invert(x)


def test_lowpass_matches_the_tikhonov_normal_equations() -> None:
    """The Fourier solve is (I + λ DᵀD) l = s on the reflect-padded image with circular differences."""
    g = torch.Generator().manual_seed(2)
    s = torch.rand(1, 1, 6, 5, generator=g, dtype=torch.float64)
    lam, pad = 3.0, 2
    low = tikhonov_lowpass(s, lam, pad)
    padded = torch.nn.functional.pad(s, (pad,) * 4, mode="reflect")[0, 0]
    h, w = padded.shape

    def diff(n: int) -> torch.Tensor:  # circular forward difference
        return torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=1) - torch.eye(n, dtype=torch.float64)

    dy = torch.kron(diff(h), torch.eye(w, dtype=torch.float64))
    dx = torch.kron(torch.eye(h, dtype=torch.float64), diff(w))
    a = torch.eye(h * w, dtype=torch.float64) + lam * (dy.T @ dy + dx.T @ dx)
    reference = torch.linalg.solve(a, padded.flatten()).view(h, w)[pad:-pad, pad:-pad]
    assert torch.allclose(low[0, 0], reference, atol=1e-10)


def test_normalization_fit_is_the_per_channel_mean() -> None:
    images = torch.zeros(2, 3, 4, 4)
    images[:, 0] = 0.2
    images[:, 2] = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    norm = Normalization.fit(images, scale=2.0)
    assert norm.mean == pytest.approx((0.2, 0.0, 0.5)) and norm.scale == 2.0
    assert norm.apply(images).mean(dim=(0, 2, 3)).abs().max() < 1e-6


def test_normalization_rejects_bad_input() -> None:
    norm = Normalization(mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"expected 3 channels, got 1"):
        norm.apply(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        norm.invert(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        Normalization(mean=(0.5,), scale=0.0)
    with pytest.raises(ValueError, match="shape"):
        norm.apply(torch.rand(3, 4))
    with pytest.raises(ValueError, match="kind"):
        Normalization(mean=(0.5,), kind="zscore")
    with pytest.raises(ValueError, match="unknown keys"):
        Normalization.from_dict({"mean": [0.5], "sigma": 1.0})
    with pytest.raises(ValueError, match="do not match"):
        Normalization(mean=(0.5,), kind="image_mean").invert(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))


# --------------------------------------------------------------------------------------------------
# natural (embedded)
# --------------------------------------------------------------------------------------------------


def test_natural_sources_are_disjoint_offline_photos() -> None:
    sources = DEFAULT_SOURCES
    assert set(sources) == {"train", "val", "test"}
    assert sources["val"] == ["chelsea"] and sources["test"] == ["coffee", "rocket"]
    every = [s for split in sources.values() for s in split] + GRAY_SOURCES
    assert len(every) == len(set(every)), "a photo is used in two splits"
    for name in every:
        photo = load_photo(name, 1.0)
        assert photo.shape[0] == 3 and min(photo.shape[1:]) >= 150
        assert photo.dtype == torch.float32 and photo.min() >= 0.0 and photo.max() <= 1.0
    for name in GRAY_SOURCES:  # grayscale photos load as three equal channels
        photo = load_photo(name, 0.25)
        assert torch.equal(photo[0], photo[1]) and torch.equal(photo[1], photo[2])


def test_natural_config_lists_the_sources_and_refuses_overlaps() -> None:
    conf = compose_config([], output_dir="/tmp/unused").data  # the sources come from the signature
    assert OmegaConf.to_container(conf.sources) == DEFAULT_SOURCES
    assert list(conf.gray_sources) == GRAY_SOURCES
    with pytest.raises(ValueError, match="both the train and the test split"):
        NaturalDataModule(sources={"train": ["astronaut", "coffee"], "val": ["chelsea"], "test": ["coffee"]})
    with pytest.raises(ValueError, match="unknown photos"):
        NaturalDataModule(sources={"train": ["lena"], "val": ["chelsea"], "test": ["coffee"]})
    with pytest.raises(ValueError, match="scale_jitter"):
        NaturalDataModule(scale=0.5, scale_jitter=[3.0])
    gray = NaturalDataModule(grayscale=True, n_train=20)
    assert set(GRAY_SOURCES) <= set(gray.sources["train"])
    assert gray.tensor("train")[0].shape == (20, 1, 32, 32)


def test_natural_scale_jitter_and_flip_rotate_augmentation() -> None:
    dm = NaturalDataModule(n_train=36, n_val=4, n_test=4, scale_jitter=[1.0, 0.7, 0.5], flip=True, rot90=True)
    train = dm.split_dataset("train")
    assert {sc for _, sc in train.sources} == {0.5, 0.35, 0.25}
    assert train.positions[:, 0].unique().tolist() == list(range(9))  # 3 photos × 3 scales, round robin
    assert dm.split_dataset("test").sources == [("coffee", 0.5), ("rocket", 0.5)]  # eval splits: one scale
    clean = dm.tensor("train")[0]
    torch.manual_seed(0)
    seen = torch.cat([x for x, _ in dm.train_dataloader()])
    # every loaded crop is a flipped/rotated version of a clean crop (the loader shuffles)
    variants = [torch.rot90(base, k, (-2, -1)) for c in clean for base in (c, c.flip(-1)) for k in range(4)]
    stacked = torch.stack(variants).flatten(1)
    for x in seen:
        assert (stacked - x.flatten()).abs().amax(dim=1).min() < 1e-7
    assert not torch.equal(torch.sort(seen.flatten(1), dim=0)[0], torch.sort(clean.flatten(1), dim=0)[0])


def test_natural_crops_shapes_ranges_and_structure(natural: NaturalDataModule) -> None:
    assert isinstance(natural, pl.LightningDataModule) and isinstance(natural, ImageDataModule)
    assert natural.name == "natural" and natural.channels == 3 and natural.num_classes is None
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        images, labels = natural.tensor(split)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.float32
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert torch.all(labels == -1) and labels.dtype == torch.int64
        assert images.flatten(1).std(dim=1).min() >= natural.min_std  # no flat patches
    # each split draws from each of its photos (round robin)
    used = natural.split_dataset("train").positions[:, 0].unique().tolist()
    assert used == list(range(len(natural.split_dataset("train").sources)))


def test_natural_is_deterministic_per_seed() -> None:
    kw = {"n_train": 24, "n_val": 4, "n_test": 4}
    a = NaturalDataModule(seed=3, **kw).tensor("train")[0]
    b = NaturalDataModule(seed=3, **kw).tensor("train")[0]
    c = NaturalDataModule(seed=4, **kw).tensor("train")[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_natural_grayscale_crop_size_and_validation() -> None:
    rgb = NaturalDataModule(n_train=8, n_val=2, n_test=4).tensor("test")[0]
    gray_dm = NaturalDataModule(n_train=8, n_val=2, n_test=4, grayscale=True)
    gray = gray_dm.tensor("test")[0]
    assert gray_dm.channels == 1 and gray.shape == (4, 1, 32, 32)
    assert torch.allclose(gray, luminance(rgb), atol=1e-6)
    big = NaturalDataModule(crop_size=96, n_train=4, n_val=2, n_test=4).tensor("test")[0]
    assert big.shape == (4, 3, 96, 96)
    with pytest.raises(ValueError, match="crop_size"):
        NaturalDataModule(crop_size=4000, n_train=4).split_dataset("train")
    for kwargs, arg in (
        ({"batch_size": 0}, "batch_size"),
        ({"crop_size": 0}, "crop_size"),
        ({"n_train": 0}, "n_train"),
        ({"scale": 0.0}, "scale"),
    ):
        with pytest.raises(ValueError, match=arg):
            NaturalDataModule(**kwargs)
    with pytest.raises(ValueError, match="split"):
        NaturalDataModule(n_train=4).split_dataset("training")


def test_normalization_property_is_fitted_on_train_only(natural: NaturalDataModule) -> None:
    norm = natural.normalization
    assert natural.normalization is norm  # cached
    train = Normalization.fit(natural.tensor("train")[0])
    val = Normalization.fit(natural.tensor("val")[0])
    assert norm.mean == pytest.approx(train.mean, abs=1e-6)
    assert norm.mean != pytest.approx(val.mean, abs=1e-3)
    assert norm.channels == natural.channels


def test_loaders_seeded_shuffle_and_unshuffled_eval(natural: NaturalDataModule) -> None:
    train_images = natural.tensor("train")[0]
    first = torch.cat([x for x, _ in natural.train_dataloader()])
    second = torch.cat([x for x, _ in natural.train_dataloader()])
    assert torch.equal(first, second), "train order must be reproducible for a fixed seed"
    assert not torch.equal(first, train_images), "train loader must shuffle"
    assert torch.equal(torch.cat([x for x, _ in natural.predict_dataloader()]), train_images)
    assert torch.equal(torch.cat([x for x, _ in natural.val_dataloader()]), natural.tensor("val")[0])
    _check_batch(next(iter(natural.test_dataloader())), channels=3, size=32)
    assert natural.tensor("train", limit=5)[0].shape[0] == 5


# --------------------------------------------------------------------------------------------------
# digits (embedded, labelled)
# --------------------------------------------------------------------------------------------------


def test_digits_stratified_split_and_shapes() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    assert dm.name == "digits" and dm.num_classes == 10 and dm.channels == 1
    parts = {s: dm.tensor(s) for s in ("train", "val", "test")}
    assert sum(len(y) for _, y in parts.values()) == 1797
    totals = sum(torch.bincount(y, minlength=10) for _, y in parts.values())
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        x, y = parts[split]
        assert x.shape[1:] == (1, 32, 32) and x.min() >= 0 and x.max() <= 1
        assert set(y.tolist()) == set(range(10))
        counts = torch.bincount(y, minlength=10)
        assert torch.all((counts - frac * totals).abs() <= 1), f"{split} is not stratified"
    _check_batch(next(iter(dm.train_dataloader())), channels=1, size=32)
    rgb = DigitsDataModule(rgb=True).tensor("val", limit=4)[0]
    assert rgb.shape == (4, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(ValueError, match="rgb"):
        DigitsDataModule(rgb=True, grayscale=True)


def test_stratified_split_is_disjoint_and_seeded() -> None:
    labels = torch.arange(100) % 4
    a = stratified_split(labels, (0.6, 0.2, 0.2), seed=1)
    b = stratified_split(labels, (0.6, 0.2, 0.2), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    joined = torch.cat(a)
    assert len(joined) == 100 and len(joined.unique()) == 100
    assert [len(p) for p in a] == [60, 20, 20]
    assert not torch.equal(a[1], stratified_split(labels, (0.6, 0.2, 0.2), seed=2)[1])


# --------------------------------------------------------------------------------------------------
# on-disk datasets through tiny fakes in the real formats
# --------------------------------------------------------------------------------------------------


def test_cifar10_fake_loads_with_real_layout(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root), batch_size=8)
    dm.setup()
    x_train, y_train = dm.tensor("train")
    x_val, y_val = dm.tensor("val")
    x_test, y_test = dm.tensor("test")
    assert len(x_train) == 45 and len(x_val) == 5 and len(x_test) == 10  # 10 % of train carved as val
    assert len(set(y_val.tolist())) == 5  # stratified: 5 per class, so no class twice in a 5-image val
    train_ids, val_ids = list(map(_signature, x_train)), list(map(_signature, x_val))
    assert sorted(train_ids + val_ids) == list(range(50))  # train and val partition the five batches
    assert list(map(_signature, x_test)) == list(range(50, 60))  # test_batch, in file order
    for images, labels, ids in ((x_train, y_train, train_ids), (x_val, y_val, val_ids),
                                (x_test, y_test, range(50, 60))):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        for image, label, i in zip(images, labels.tolist(), ids, strict=True):
            assert torch.equal(image, as_item(cifar_image(i))), f"image {i}"  # channel order, no transpose
            assert label == cifar_label(i)
    _check_batch(next(iter(dm.train_dataloader())), channels=3, size=32)


def test_cifar10_random_crop_is_train_only_and_grayscale(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root), batch_size=8, crop_size=24, grayscale=True)
    _check_batch(next(iter(dm.train_dataloader())), channels=1, size=24)
    _check_batch(next(iter(dm.val_dataloader())), channels=1, size=32)
    _check_batch(next(iter(dm.predict_dataloader())), channels=1, size=32)
    x_test, _ = dm.tensor("test")  # luminance of the float RGB image, BT.601 weights
    assert torch.allclose(x_test[3], luminance(as_item(cifar_image(53))), atol=1e-6)


def test_stl10_fake_loads_with_column_major_images(tmp_path: Path) -> None:
    dm = STL10DataModule(data_dir=str(make_stl10(tmp_path)), batch_size=4)
    x, y = dm.tensor("test")
    assert x.shape == (10, 3, 96, 96) and x.dtype == torch.float32
    assert y.tolist() == [stl_label(i) for i in range(10)]
    for i in range(10):  # the marker sits at row 0, column 7: the column-major files were transposed
        assert torch.equal(x[i], as_item(stl_image(i)))
    x_train, y_train = dm.tensor("train")
    x_val, y_val = dm.tensor("val")
    assert len(x_train) == 18 and len(x_val) == 2
    ids = [round(float(img[2, 0, 0]) * 255) for img in torch.cat([x_train, x_val])]
    assert sorted(ids) == list(range(20))
    for image, label, i in zip(torch.cat([x_train, x_val]), torch.cat([y_train, y_val]).tolist(), ids,
                               strict=True):
        assert torch.equal(image, as_item(stl_image(i))) and label == stl_label(i)
    assert dm.num_classes == 10
    _check_batch(next(iter(dm.train_dataloader())), channels=3, size=96)


def test_stl10_truncated_file_is_named(tmp_path: Path) -> None:
    root = make_stl10(tmp_path)
    images = root / "stl10_binary" / "test_X.bin"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"test_X\.bin.*corrupt or truncated"):
        STL10DataModule(data_dir=str(root)).split_dataset("test")


def test_pets_fake_loads_resized_and_labelled(tmp_path: Path) -> None:
    root = make_pets(tmp_path)
    dm = PetsDataModule(data_dir=str(root), image_size=32, batch_size=4, val_fraction=0.25)
    x_test, y_test = dm.tensor("test")
    test_list = pets_list(root, "test.txt")
    assert x_test.shape == (6, 3, 32, 32) and x_test.dtype == torch.float32
    assert y_test.tolist() == [label for _, label in test_list]
    for image, (path, _) in zip(x_test, test_list, strict=True):
        assert torch.allclose(image, pets_item(path, 32), atol=1e-6), path.name
    trainval = pets_list(root, "trainval.txt")
    x_train, y_train = dm.tensor("train")
    x_val, y_val = dm.tensor("val")
    assert len(x_train) == 9 and len(x_val) == 3
    expected = torch.stack([pets_item(path, 32) for path, _ in trainval])
    found = []
    for image, label in zip(torch.cat([x_train, x_val]), torch.cat([y_train, y_val]).tolist(), strict=True):
        k = int((expected - image).abs().flatten(1).amax(1).argmin())
        assert torch.allclose(image, expected[k], atol=1e-6) and label == trainval[k][1]
        found.append(k)
    assert sorted(found) == list(range(12))  # train and val partition trainval
    grey = trainval.index(next(t for t in trainval if t[0].name == "Abyssinian_1.jpg"))
    assert torch.equal(expected[grey][0], expected[grey][2])  # greyscale JPEGs load as 3 equal channels
    assert dm.classes == PET_CLASSES
    assert dm.num_classes == 37
    _check_batch(next(iter(dm.train_dataloader())), channels=3, size=32)


def test_pets_unpacked_without_the_subfolder_says_where_to_move_it(tmp_path: Path) -> None:
    root = make_pets(tmp_path / "nested")
    flat = tmp_path / "flat"
    (root / "oxford-iiit-pet").rename(flat)  # images/ and annotations/ directly in data_dir
    with pytest.raises(DatasetNotFoundError, match=r"move images/ and annotations/.*oxford-iiit-pet/"):
        PetsDataModule(data_dir=str(flat)).split_dataset("test")


def test_folder_fake_with_and_without_test(tmp_path: Path) -> None:
    dm = FolderDataModule(data_dir=str(make_folder(tmp_path / "a")), batch_size=4)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    x, y = dm.tensor("test")
    assert x.shape == (8, 3, 16, 16) and y.tolist() == [0] * 4 + [1] * 4
    assert x[5, 0, 0, 0].item() == pytest.approx(41 / 255)
    _check_batch(next(iter(dm.train_dataloader())), channels=3, size=16)
    no_test = FolderDataModule(data_dir=str(make_folder(tmp_path / "b", test=False)), image_size=8)
    assert torch.equal(no_test.tensor("test")[1], no_test.tensor("val")[1])  # val doubles as test
    assert no_test.tensor("val")[0].shape[-2:] == (8, 8)


def test_folder_tiny_imagenet_val_layout(tmp_path: Path) -> None:
    root = make_folder(tmp_path, classes=("n01", "n02"), test=False)
    val = root / "val"
    for d in val.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    (val / "images").mkdir()
    rows = []
    for k, wnid in enumerate(["n02", "n01", "n02"]):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(val / "images" / f"val_{k}.JPEG")
        rows.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t15\t15")
    (val / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    dm = FolderDataModule(data_dir=str(root))
    assert dm.tensor("val")[1].tolist() == [1, 0, 1]


def test_empty_split_names_dataset_and_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path, test=False)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    with pytest.raises(ValueError, match=r"'folder'.*'val'"):
        FolderDataModule(data_dir=str(root)).split_dataset("val")


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (CIFAR10DataModule, ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch",
                               "cifar-10-batches-py/batches.meta"]),
        (STL10DataModule, ["stl10_binary/train_X.bin", "stl10_binary/test_y.bin"]),
        (PetsDataModule, ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt"]),
        (FolderDataModule, ["train", "val"]),
    ],
)
def test_missing_files_error_names_directory_and_files(
    tmp_path: Path, cls: type[ImageDataModule], expected: list[str]
) -> None:
    dm = cls(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str((tmp_path / "nowhere").resolve()) in msg
    for name in expected:
        assert name in msg
    assert "data.data_dir" in msg
    if cls is not FolderDataModule:
        assert "data.download=true" in msg


@pytest.mark.parametrize(
    ("cls", "module", "make", "archives"),
    [
        (CIFAR10DataModule, torchvision.datasets.cifar, make_cifar10, ["cifar-10-python.tar.gz"]),
        (STL10DataModule, torchvision.datasets.stl10, make_stl10, ["stl10_binary.tar.gz"]),
        (PetsDataModule, torchvision.datasets.oxford_iiit_pet, make_pets,
         ["images.tar.gz", "annotations.tar.gz"]),
    ],
)
def test_download_true_fetches_through_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: type[ImageDataModule], module: ModuleType,
    make: Callable[[Path], Path], archives: list[str]
) -> None:
    """download=true goes through torchvision's download (archive md5 given); the files are then read."""
    fetched: list[tuple[str, str | None]] = []

    def fake_download(url: str, download_root: str, *args: object, **kwargs: object) -> None:
        fetched.append((url.rsplit("/", 1)[-1], kwargs.get("md5")))
        if not fetched[1:]:
            make(tmp_path)  # what the archives hold

    monkeypatch.setattr(module, "download_and_extract_archive", fake_download)
    dm = cls(data_dir=str(tmp_path), download=True)  # type: ignore[call-arg]
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    assert [name for name, _ in fetched] == archives
    assert all(isinstance(md5, str) and len(md5) == 32 for _, md5 in fetched)
    x, y = dm.tensor("test")
    assert len(x) == len(y) > 0 and x.dtype == torch.float32


def test_registry_and_builder() -> None:
    assert set(DATAMODULES) == {"natural", "digits", "cifar10", "stl10", "pets", "folder"}
    assert all(issubclass(c, ImageDataModule) and c.name == n for n, c in DATAMODULES.items())
    dm = build_datamodule("digits", batch_size=8)
    assert isinstance(dm, DigitsDataModule) and dm.batch_size == 8
    with pytest.raises(ValueError, match="natural"):
        build_datamodule("imagenet")


# --------------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------------

GREY = torch.full((16, 3, 32, 32), 0.5)


def test_corruption_registry_levels_and_unknown_name() -> None:
    names = {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur"}
    assert set(CORRUPTIONS) == set(DEFAULT_LEVELS) == names
    assert all(len(levels) >= 4 and all(lv > 0 for lv in levels) for levels in DEFAULT_LEVELS.values())
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(GREY, "fog", 0.1, seed=0)
    with pytest.raises(ValueError, match="level"):
        corrupt(GREY, "gaussian_noise", -0.1, seed=0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_are_deterministic_and_in_range(name: str) -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    level = DEFAULT_LEVELS[name][1]
    a = corrupt(images, name, level, seed=7)
    b = corrupt(images, name, level, seed=7)
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, images)
    if name != "gaussian_blur":
        assert not torch.equal(a, corrupt(images, name, level, seed=8))
    assert torch.equal(corrupt(images, name, 0.0, seed=7), images)  # level 0: unchanged


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
@pytest.mark.parametrize("level", [0.05, 0.1])
def test_noise_std_matches_level_on_mid_grey(name: str, level: float) -> None:
    noisy = corrupt(GREY, name, level, seed=0)
    assert (noisy - GREY).std().item() == pytest.approx(level, rel=0.1)
    assert (noisy - GREY).mean().abs().item() < 0.1 * level


def test_impulse_fraction_matches_level() -> None:
    for level in (0.05, 0.2):
        out = corrupt(GREY, "impulse_noise", level, seed=1)
        changed = out != GREY
        assert changed.float().mean().item() == pytest.approx(level, rel=0.1)
        assert torch.all((out[changed] == 0) | (out[changed] == 1))


def test_blur_identity_at_zero_and_removes_high_frequencies() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator()
    assert torch.equal(gaussian_blur(images, 0.0, g), images)

    def hf_energy(x: torch.Tensor) -> float:
        dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
        return float(dy + (x[..., 1:] - x[..., :-1]).pow(2).mean())

    energies = [hf_energy(corrupt(images, "gaussian_blur", lv, seed=0)) for lv in (0.0, 0.5, 1.0, 2.0)]
    assert all(a > b for a, b in zip(energies, energies[1:], strict=False))
    assert energies[-1] < 0.1 * energies[0]
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 3.0, g), flat)  # mean preserved, borders included
    assert gaussian_blur(images[0], 1.0, g).shape == images[0].shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_corrupt_is_device_independent() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        cpu = corrupt(images, name, DEFAULT_LEVELS[name][2], seed=3)
        gpu = corrupt(images.cuda(), name, DEFAULT_LEVELS[name][2], seed=3).cpu()
        assert torch.allclose(cpu, gpu, atol=1e-5)


def test_a_data_config_from_before_the_norm_group_gives_the_same_test_crops() -> None:
    """Runs made before the ``norm`` group saved ``norm_scale`` and no ``sources``: evaluating them
    still builds the natural datamodule (the stale key dropped), on the same test crops as today."""
    from warplca.evaluation.common import build_datamodule_from_config

    old = {"_target_": "warplca.data.NaturalDataModule", "n_train": 8, "n_val": 4, "n_test": 6, "seed": 0,
           "scale": 0.5, "min_std": 0.02, "norm_scale": 1.0}
    today = NaturalDataModule(n_train=8, n_val=4, n_test=6, seed=0)
    assert torch.equal(build_datamodule_from_config(old).tensor("test")[0], today.tensor("test")[0])


def test_stratified_order_gives_nested_stratified_prefixes() -> None:
    """The learning curve's samples: every prefix holds each stratum within one item of its share, and a
    larger sample contains every smaller one (it is a prefix of the same seeded order)."""
    from collections import Counter

    from warplca.data.datamodule import stratified_order
    from warplca.tasks.stage_learning_curve import nested_order

    labels = [0] * 60 + [1] * 30 + [2] * 10
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(100))
    for n in (10, 20, 37, 50, 100):
        counts = Counter(labels[i] for i in order[:n].tolist())
        shares = ((0, 0.6), (1, 0.3), (2, 0.1))
        assert all(abs(counts[c] - share * n) <= 1 for c, share in shares), (n, counts)
    assert torch.equal(order, stratified_order(labels, seed=3))
    assert not torch.equal(order, stratified_order(labels, seed=4))
    # natural crops: photo × scale; the first 9 of 90 crops come one from each of the 9 sources
    crops = NaturalDataModule(n_train=90, n_val=2, n_test=2).split_dataset("train")
    first = nested_order(crops, len(crops), seed=0)[:9]
    assert sorted(crops.strata[first].tolist()) == list(range(9))
