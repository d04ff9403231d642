"""Normalisation between [0, 1] pixels and the space LCA codes in (the ``norm`` config group).

Every option splits an image into a part kept *outside* the code (the ``base``, on the pixel scale) and
the part LCA codes::

    x = (images − base(images)) / gain(images)          apply
    images ≈ x̂ · gain(images) + base(images)            invert (x̂ = Φa, the reconstruction)

=================  ==========================================  =========================================
kind               base (kept outside the code)                gain; what λ is measured in
=================  ==========================================  =========================================
``dataset_mean``   the train split's channel means (constant)  ``scale``; pixel units / scale
``image_mean``     each image's own channel means              ``scale``; pixel units / scale
``standardize``    each image's mean over all channels         (image std + eps)·``scale``; units of the
                                                               image's own standard deviation (lca-pytorch)
``lowpass``        a Tikhonov low-pass of the image            ``scale``; pixel units / scale, on the
                   (sporco's convention, ``lowpass_lambda``)   high-pass detail only
=================  ==========================================  =========================================

The per-image kinds are undone from the source images (``invert(x, images=...)`` recomputes base and
gain). PSNR/SSIM are reported on the pixel scale after :meth:`invert`; the base costs no coefficient,
which is why rate–distortion curves name the normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from warplca.settings import Annotated, Doc, Ge, Gt, OneOf, SettingsError, problems

__all__ = ["KINDS", "Normalization", "tikhonov_lowpass"]

#: the normalisation options (``norm.kind``)
KINDS: tuple[str, ...] = ("dataset_mean", "image_mean", "standardize", "lowpass")
_PER_IMAGE = frozenset({"image_mean", "standardize", "lowpass"})
#: the fields of :meth:`Normalization.to_dict`, in order
_FIELDS = ("kind", "mean", "scale", "lowpass_lambda", "lowpass_pad", "eps")


def tikhonov_lowpass(images: Tensor, lam: float, pad: int = 16) -> Tensor:
    """argmin_l ½‖l − s‖² + (λ/2)(‖∂ₓl‖² + ‖∂ᵧl‖²) per channel, solved in the Fourier domain.

    The image is reflect-padded by ``pad`` pixels first (less at small sizes) so the circular solve
    does not wrap borders into each other — sporco's ``tikhonov_filter`` convention.
    """
    height, width = images.shape[-2:]
    p = max(0, min(int(pad), height - 1, width - 1))
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    padded = F.pad(work, (p, p, p, p), mode="reflect") if p else work
    h, w = padded.shape[-2:]
    wy = torch.fft.fftfreq(h, device=images.device, dtype=work.dtype) * (2 * math.pi)
    wx = torch.fft.fftfreq(w, device=images.device, dtype=work.dtype) * (2 * math.pi)
    denominator = 1 + lam * ((2 - 2 * torch.cos(wy))[:, None] + (2 - 2 * torch.cos(wx))[None, :])
    low = torch.fft.ifft2(torch.fft.fft2(padded) / denominator).real
    return low[..., p : p + height, p : p + width].to(images.dtype)


@dataclass(frozen=True)
class Normalization:
    """One of :data:`KINDS` (see the module doc), on ``(C, H, W)`` or ``(B, C, H, W)`` float tensors.

    ``mean``: the train split's channel means on the pixel scale (the base of ``dataset_mean``; it also
    fixes the channel count). ``lowpass_lambda``/``lowpass_pad``: λ and reflect padding (pixels) of the
    ``lowpass`` solve. ``eps``: added to the per-image std of ``standardize`` so flat images stay finite.
    """

    mean: tuple[float, ...]
    scale: Annotated[float, Gt(0), Doc("the gain: λ is in pixel units / scale")] = 1.0
    kind: Annotated[str, OneOf(KINDS, "normalisation")] = "dataset_mean"
    lowpass_lambda: Annotated[float, Gt(0), Doc("λ of the lowpass kind's Tikhonov solve")] = 5.0
    lowpass_pad: Annotated[int, Ge(0), Doc("reflect padding (pixels) of the lowpass solve")] = 16
    eps: Annotated[float, Gt(0), Doc("added to the per-image std of standardize")] = 1e-2

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        if len(mean) == 0:
            raise ValueError("Normalization.mean must have one entry per channel, got an empty sequence")
        if not all(math.isfinite(m) for m in mean):
            raise ValueError(f"Normalization.mean must be finite, got {mean}")
        bad = problems(Normalization, {name: getattr(self, name) for name in _FIELDS if name != "mean"})
        if bad:
            raise SettingsError(bad)
        for name in ("scale", "lowpass_lambda", "eps"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "mean", mean)

    @property
    def channels(self) -> int:
        """Number of channels this normalisation expects."""
        return len(self.mean)

    @property
    def per_image(self) -> bool:
        """Whether undoing it needs the source images (every kind but ``dataset_mean``)."""
        return self.kind in _PER_IMAGE

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (3, 4):
            raise ValueError(
                f"expected images of shape (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
        if x.shape[-3] != self.channels:
            raise ValueError(f"channel mismatch: expected {self.channels} channels, got {x.shape[-3]}")

    def base(self, images: Tensor) -> Tensor:
        """The part of ``images`` kept outside the code, on the pixel scale (broadcastable to them)."""
        self._check(images)
        if self.kind == "dataset_mean":
            return torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        if self.kind == "image_mean":
            return images.mean(dim=(-2, -1), keepdim=True)
        if self.kind == "standardize":
            return images.mean(dim=(-3, -2, -1), keepdim=True)
        return tikhonov_lowpass(images, self.lowpass_lambda, self.lowpass_pad)

    def gain(self, images: Tensor) -> Tensor | float:
        """What the centred image is divided by: ``scale``, times (std + eps) for ``standardize``."""
        if self.kind != "standardize":
            return self.scale
        std = images.std(dim=(-3, -2, -1), keepdim=True, unbiased=False)
        return (std + self.eps) * self.scale

    def apply(self, images: Tensor) -> Tensor:
        """[0, 1] images -> normalised space: ``(images − base) / gain``."""
        return (images - self.base(images)) / self.gain(images)

    def invert(self, x: Tensor, images: Tensor | None = None) -> Tensor:
        """Normalised space -> pixel scale: ``x · gain + base`` (not clamped).

        ``images`` are the pixels ``x`` was computed from (or that a reconstruction ``x`` stands for);
        the per-image kinds recompute their base and gain from them and refuse to guess without.
        """
        self._check(x)
        if images is None:
            if self.per_image:
                raise ValueError(f"normalisation {self.kind!r} is per image: pass the source images "
                                 f"(invert(x, images=...)) to undo it")
            return x * self.scale + self.base(x)
        if tuple(images.shape[-3:]) != tuple(x.shape[-3:]):
            raise ValueError(f"invert: images of shape {tuple(images.shape)} do not match x of shape "
                             f"{tuple(x.shape)}")
        return x * self.gain(images) + self.base(images)

    __call__ = apply

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for checkpoints, manifests and JSON."""
        return {k: list(self.mean) if k == "mean" else getattr(self, k) for k in _FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`; artifacts written before ``kind`` existed are ``dataset_mean``."""
        if "mean" not in d:
            raise ValueError(f"Normalization.from_dict needs a 'mean' key, got keys {sorted(d)}")
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise ValueError(f"Normalization.from_dict: unknown keys {sorted(unknown)}")
        return cls(**{**d, "mean": tuple(d["mean"]), "kind": str(d.get("kind", "dataset_mean"))})

    @classmethod
    def fit(cls, images: Tensor, scale: float = 1.0, kind: str = "dataset_mean",
            **options: Any) -> Normalization:
        """The normalisation with the channel means of ``(B, C, H, W)`` or ``(C, H, W)`` [0, 1] images
        (fit on the training split only, so val/test statistics never leak into the model)."""
        if not isinstance(images, Tensor) or images.ndim not in (3, 4):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"Normalization.fit expects images of shape (B, C, H, W) or (C, H, W), got {shape}"
            )
        if images.numel() == 0:
            raise ValueError("Normalization.fit got an empty tensor")
        x = images if images.ndim == 4 else images.unsqueeze(0)
        mean = x.detach().to(torch.float64).mean(dim=(0, 2, 3))
        return cls(mean=tuple(mean.tolist()), scale=scale, kind=kind, **options)

    @classmethod
    def identity(cls, channels: int) -> Normalization:
        """The no-op normalisation (zero mean, unit scale) for ``channels`` channels."""
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        return cls(mean=(0.0,) * channels, scale=1.0)
