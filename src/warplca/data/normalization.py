"""Per-channel normalisation between [0, 1] pixels and the space LCA codes in.

LCA reconstructs ``x = (images - mean_c) / scale``: removing the channel mean keeps the dictionary from
spending atoms on the DC level, and ``scale`` sets the dynamic range the threshold λ is measured in.
PSNR/SSIM are always reported on the [0, 1] pixel scale, i.e. after :meth:`Normalization.invert`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Affine map ``x = (images - mean_c) / scale`` with one mean per channel.

    ``mean`` is on the [0, 1] pixel scale; ``scale`` > 0 divides after the mean is removed.
    Works on ``(C, H, W)`` or ``(B, C, H, W)`` tensors on any device and floating dtype.
    """

    mean: tuple[float, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        if len(mean) == 0:
            raise ValueError("Normalization.mean must have one entry per channel, got an empty sequence")
        if not all(math.isfinite(m) for m in mean):
            raise ValueError(f"Normalization.mean must be finite, got {mean}")
        scale = float(self.scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"Normalization.scale must be a finite number > 0, got {self.scale!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)

    @property
    def channels(self) -> int:
        """Number of channels this normalisation expects."""
        return len(self.mean)

    def _mean_like(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (3, 4):
            raise ValueError(
                f"expected images of shape (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
        got = x.shape[-3]
        if got != self.channels:
            raise ValueError(f"channel mismatch: expected {self.channels} channels, got {got}")
        return torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)

    def apply(self, images: Tensor) -> Tensor:
        """[0, 1] images -> normalised space: ``(images - mean_c) / scale``."""
        return (images - self._mean_like(images)) / self.scale

    def invert(self, x: Tensor) -> Tensor:
        """Normalised space -> pixel scale: ``x * scale + mean_c`` (not clamped)."""
        return x * self.scale + self._mean_like(x)

    __call__ = apply

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for checkpoints, manifests and JSON."""
        return {"mean": list(self.mean), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`."""
        if "mean" not in d:
            raise ValueError(f"Normalization.from_dict needs a 'mean' key, got keys {sorted(d)}")
        return cls(mean=tuple(d["mean"]), scale=float(d.get("scale", 1.0)))

    @classmethod
    def fit(cls, images: Tensor, scale: float = 1.0) -> Normalization:
        """Per-channel mean of a ``(B, C, H, W)`` (or ``(C, H, W)``) tensor of [0, 1] images.

        Fit on the training split only, so that validation/test statistics never leak into the model.
        """
        if not isinstance(images, Tensor) or images.ndim not in (3, 4):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"Normalization.fit expects images of shape (B, C, H, W) or (C, H, W), got {shape}"
            )
        if images.numel() == 0:
            raise ValueError("Normalization.fit got an empty tensor")
        x = images if images.ndim == 4 else images.unsqueeze(0)
        mean = x.detach().to(torch.float64).mean(dim=(0, 2, 3))
        return cls(mean=tuple(mean.tolist()), scale=scale)

    @classmethod
    def identity(cls, channels: int) -> Normalization:
        """The no-op normalisation (zero mean, unit scale) for ``channels`` channels."""
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        return cls(mean=(0.0,) * channels, scale=1.0)
