"""``natural``: deterministic random crops of the photos bundled with scikit-image (offline default).

The photos are split **by source image** (:data:`DEFAULT_SOURCES`), so validation/test crops come from
scenes the dictionary and predictor never saw. Only the colour photos of natural scenes inside
scikit-image's wheel are used by default (no ``pooch`` downloads); ``grayscale=true`` adds the gray
ones (:data:`GRAY_SOURCES`) to train.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from warplca.data.datamodule import SPLITS, FlipRotateDataset, ImageDataModule, luminance
from warplca.settings import Annotated, Doc, Ge, Gt, Le, Lt, NonEmpty, checked

__all__ = ["DEFAULT_SOURCES", "GRAY_SOURCES", "NaturalCrops", "NaturalDataModule", "load_photo"]

log = logging.getLogger(__name__)


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[index] if index is not None else img

    return load


#: photo name -> loader returning an (H, W, 3) or (H, W) uint8 array from scikit-image's bundled files
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _skimage(name) for name in ("astronaut", "camera", "brick", "grass", "gravel", "moon", "coins",
                                         "hubble_deep_field", "immunohistochemistry", "retina", "chelsea",
                                         "coffee", "rocket")},
    "clock_motion": _skimage("clock"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
}

# per-split offsets of the crop-position seed, so train/val/test draws are independent
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@functools.lru_cache(maxsize=32)
def load_photo(name: str, scale: float = 1.0) -> Tensor:
    """Bundled photo ``name`` as a float32 ``(3, H, W)`` tensor in [0, 1], downscaled by ``scale``
    (antialiased bilinear). Cached per process (decoding costs ~0.1 s): treat it as read-only."""
    if name not in _LOADERS:
        raise ValueError(f"unknown photo {name!r}; known: {sorted(_LOADERS)}")
    try:
        arr = _LOADERS[name]()
    except Exception as exc:  # pragma: no cover - depends on the installed scikit-image
        raise RuntimeError(
            f"could not load scikit-image's bundled photo {name!r} (scikit-image data files missing?): {exc}"
        ) from exc
    if arr.ndim == 2:  # a grayscale photo: three equal channels (its luminance is itself)
        arr = np.repeat(arr[..., None], 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).to(torch.float32) / 255.0
    if scale != 1.0:
        x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        x = x[0].clamp_(0.0, 1.0)
    return x.contiguous()


class NaturalCrops(Dataset):
    """Fixed crops of cached photos, items ``(crop, -1)``; ``positions`` is (N, 3) int64: index into the
    ``(photo, scale)`` ``sources``, top, left."""

    def __init__(self, sources: list[tuple[str, float]], positions: Tensor, crop_size: int,
                 grayscale: bool) -> None:
        self.sources, self.positions = list(sources), positions
        self.crop_size, self.grayscale = crop_size, grayscale

    @property
    def strata(self) -> Tensor:
        """The (photo, scale) source of each crop: what a sample of the split is stratified by."""
        return self.positions[:, 0]

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        s, top, left = (int(v) for v in self.positions[i])
        c = self.crop_size
        x = load_photo(*self.sources[s])[:, top : top + c, left : left + c].clone()
        return (luminance(x) if self.grayscale else x), -1


#: the default split by photo (``sources`` in conf/data/natural.yaml); no photo appears in two splits
DEFAULT_SOURCES: dict[str, list[str]] = {
    "train": ["astronaut", "motorcycle_left", "motorcycle_right"],
    "val": ["chelsea"],
    "test": ["coffee", "rocket"],
}
#: grayscale photos of natural scenes added to the train split when ``grayscale=true``
GRAY_SOURCES: list[str] = ["camera", "brick", "grass", "gravel", "moon", "coins", "clock_motion"]


class NaturalDataModule(ImageDataModule):
    """Random ``crop_size`` crops (default 32x32 RGB) of scikit-image's bundled photos, split by photo.

    Each split draws equally many crops from each (photo, scale) source, at positions seeded by
    ``seed`` and the split; crops with pixel std below ``min_std`` (flat sky, borders) are redrawn, so
    the same arguments give bit-identical data. ``scale`` downscales the photos first; ``scale_jitter``
    adds training crops at ``scale × m``; ``flip``/``rot90`` augment the train loader only.
    """

    name = "natural"
    crop_is_augmentation = False

    @checked
    def __init__(self, batch_size: Annotated[int, Ge(1), Doc("images per process and step")] = 64,
                 num_workers: Annotated[int, Ge(0)] = 0,
                 grayscale: Annotated[bool, Doc("luminance only; adds gray_sources to train")] = False,
                 crop_size: Annotated[int | None, Ge(1)] = 32, seed: Annotated[int, Ge(0)] = 0,
                 n_train: Annotated[int, Ge(1)] = 2048, n_val: Annotated[int, Ge(1)] = 256,
                 n_test: Annotated[int, Ge(1)] = 256,
                 scale: Annotated[float, Gt(0), Le(1), Doc("photos are downscaled by this first")] = 0.5,
                 min_std: Annotated[float, Ge(0), Lt(0.5), Doc("flatter crops are redrawn")] = 0.02,
                 pin_memory: bool = False,
                 sources: Annotated[Mapping[str, Sequence[str]], Doc("photos per split, none in two")] = (
                     types.MappingProxyType(DEFAULT_SOURCES)),
                 gray_sources: Annotated[Sequence[str], Doc("photos added to train by grayscale")] = tuple(
                     GRAY_SOURCES),
                 scale_jitter: Annotated[Sequence[float], Gt(0), NonEmpty(),
                                         Doc("train crops also at scale × m")] = (1.0, 0.7, 0.5),
                 flip: Annotated[bool, Doc("random horizontal flips of training crops")] = True,
                 rot90: Annotated[bool, Doc("random rotations by 90° of training crops")] = True) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, grayscale=grayscale,
                         crop_size=32 if crop_size is None else crop_size, seed=seed, pin_memory=pin_memory)
        self.n = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
        self.scale, self.min_std = float(scale), float(min_std)
        self.sources = self._check_sources(sources, gray_sources)
        jitter = [float(m) for m in scale_jitter]
        if any(m * self.scale > 1.0 for m in jitter):
            raise ValueError(f"scale_jitter must be a non-empty list of multipliers m with 0 < scale·m ≤ 1 "
                             f"(scale={self.scale}), got {list(scale_jitter)}")
        self.scale_jitter = jitter
        self.flip, self.rot90 = bool(flip), bool(rot90)

    def _check_sources(self, sources: Mapping[str, Sequence[str]],
                       gray_sources: Sequence[str]) -> dict[str, list[str]]:
        """The per-split photo lists (gray photos added to train in gray mode), validated."""
        if set(sources) != set(SPLITS):
            raise ValueError(f"sources must name the photos of each split {list(SPLITS)}, got keys "
                             f"{sorted(sources)}")
        out = {split: [str(p) for p in sources[split]] for split in SPLITS}
        if self.grayscale:
            out["train"] += [str(p) for p in gray_sources if str(p) not in out["train"]]
        for split, photos in out.items():
            if not photos:
                raise ValueError(f"sources.{split} is empty")
            unknown = sorted(set(photos) - set(_LOADERS))
            if unknown:
                raise ValueError(f"sources.{split}: unknown photos {unknown}; known: {sorted(_LOADERS)}")
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sorted(set(out[a]) & set(out[b]))
            if shared:
                raise ValueError(f"photos {shared} are in both the {a} and the {b} split "
                                 "(the split is by photo)")
        return out

    def _build_split(self, split: str) -> NaturalCrops:
        multipliers = self.scale_jitter if split == "train" else [1.0]
        sources = [(photo, self.scale * m) for photo in self.sources[split] for m in multipliers]
        c = int(self.crop_size)  # type: ignore[arg-type]
        photos = [load_photo(name, sc) for name, sc in sources]
        smallest = min(min(p.shape[-2:]) for p in photos)
        if c > smallest:
            raise ValueError(f"crop_size={c} is larger than the smallest '{split}' photo at its scale "
                             f"({smallest} px); use a smaller crop_size or a larger scale")
        n = self.n[split]
        gen = torch.Generator().manual_seed(self.seed + _SPLIT_OFFSET[split])
        counts = [n // len(sources) + (1 if k < n % len(sources) else 0) for k in range(len(sources))]
        rows = [self._draw(k, sources[k][0], photo, want, c, gen)
                for k, (photo, want) in enumerate(zip(photos, counts, strict=True)) if want]
        return NaturalCrops(sources, torch.cat(rows), c, self.grayscale)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training loader, randomly flipped/rotated when ``flip``/``rot90`` are on."""
        ds: Dataset = self.split_dataset("train")
        if self.flip or self.rot90:
            ds = FlipRotateDataset(ds, flip=self.flip, rot90=self.rot90)
        return self._loader(ds, shuffle=True)

    def _draw(self, k: int, source: str, photo: Tensor, want: int, c: int, gen: torch.Generator) -> Tensor:
        """``want`` crop positions in ``photo`` whose std >= min_std, drawn in batches from ``gen``."""
        h, w = photo.shape[-2:]
        kept: list[Tensor] = []
        have = 0
        for _ in range(50):
            m = 2 * (want - have) + 8
            tops = torch.randint(0, h - c + 1, (m,), generator=gen)
            lefts = torch.randint(0, w - c + 1, (m,), generator=gen)
            if self.min_std > 0:
                pairs = zip(tops.tolist(), lefts.tolist(), strict=True)
                ok = torch.stack([photo[:, t : t + c, x : x + c].std() for t, x in pairs]) >= self.min_std
                tops, lefts = tops[ok], lefts[ok]
            take = min(want - have, len(tops))
            kept.append(torch.stack([torch.full((take,), k), tops[:take], lefts[:take]], dim=1))
            have += take
            if have == want:
                return torch.cat(kept).to(torch.int64)
        raise ValueError(f"could not find {want} crops of {c}x{c} with std >= min_std={self.min_std} in "
                         f"photo '{source}'; lower min_std")
