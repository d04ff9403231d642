"""Deterministic image corruptions on [0, 1] images for the noisy-classification and denoising experiments.

Every corruption is ``fn(images, level, generator) -> Tensor`` on ``(B, C, H, W)`` (or ``(C, H, W)``)
images in [0, 1]; the output is clamped to [0, 1] and ``level == 0`` returns an unchanged copy.
``level`` always reads on the [0, 1] pixel scale:

- ``gaussian_noise``: additive N(0, level²) noise, i.e. ``level`` = σ.
- ``shot_noise``: Poisson noise with ``photons = 0.5 / level²`` expected photons at intensity 1, i.e.
  ``x' = Poisson(x · photons) / photons``; its std at intensity ``x`` is ``sqrt(x / photons)``, which is
  exactly ``level`` at mid-grey (0.5) and grows like ``sqrt(x)`` as real photon noise does.
- ``impulse_noise``: salt-and-pepper; each value (pixel *and* channel, like scikit-image's ``s&p``) is
  replaced with probability ``level`` by 0 or 1 (equally likely). ``level`` = corrupted fraction.
- ``gaussian_blur``: separable Gaussian blur with σ = ``level`` pixels, kernel radius ceil(3σ),
  replicate padding (works for any image size).

Noise is drawn on the generator's device, so :func:`corrupt` (a CPU generator seeded from ``(seed, name,
level)``) gives the same result on CPU and GPU.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "DEFAULT_LEVELS", "corrupt", "corruption_seed", "gaussian_blur", "gaussian_noise",
           "impulse_noise", "shot_noise"]

Corruption = Callable[[Tensor, float, torch.Generator], Tensor]


def _check(images: Tensor, level: float, name: str, max_level: float | None = None) -> float:
    if not isinstance(images, Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        desc = f"shape {tuple(images.shape)}, dtype {images.dtype}" if isinstance(images, Tensor) else images
        raise ValueError(f"{name}: expected float images of shape (B, C, H, W) or (C, H, W), got {desc}")
    level = float(level)
    if not math.isfinite(level) or level < 0 or (max_level is not None and level > max_level):
        bound = f"[0, {max_level}]" if max_level is not None else ">= 0"
        raise ValueError(f"{name}: level must be in {bound}, got {level}")
    return level


def _rand(kind: str, images: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform or normal draws shaped like ``images``, generated on ``generator.device``."""
    draw = torch.rand if kind == "uniform" else torch.randn
    out = draw(images.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=images.device, dtype=images.dtype)


def gaussian_noise(images: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """Additive Gaussian noise with std ``level`` on the [0, 1] scale, clamped."""
    level = _check(images, level, "gaussian_noise")
    if level == 0:
        return images.clone()
    return (images + level * _rand("normal", images, generator)).clamp(0.0, 1.0)


def shot_noise(images: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """Poisson (photon) noise; std ``level`` at intensity 0.5 (``photons = 0.5 / level**2``), clamped."""
    level = _check(images, level, "shot_noise")
    if level == 0:
        return images.clone()
    photons = 0.5 / level**2
    rates = (images.clamp(0.0, 1.0) * photons).to(device=generator.device, dtype=torch.float32)
    counts = torch.poisson(rates, generator=generator)
    return (counts.to(device=images.device, dtype=images.dtype) / photons).clamp(0.0, 1.0)


def impulse_noise(images: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """Salt and pepper: a fraction ``level`` of the values set to 0 or 1 (equally likely)."""
    level = _check(images, level, "impulse_noise", max_level=1.0)
    if level == 0:
        return images.clone()
    hit = _rand("uniform", images, generator) < level
    salt = _rand("uniform", images, generator) < 0.5
    return torch.where(hit, salt.to(images.dtype), images).clamp(0.0, 1.0)


def gaussian_blur(images: Tensor, level: float, generator: torch.Generator | None = None) -> Tensor:
    """Separable Gaussian blur with σ = ``level`` pixels (deterministic; ``generator`` unused), clamped."""
    level = _check(images, level, "gaussian_blur")
    if level == 0:
        return images.clone()
    x = images if images.ndim == 4 else images.unsqueeze(0)
    b, c, h, w = x.shape
    r = max(1, math.ceil(3.0 * level))  # kernel radius
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / level) ** 2)
    k = (k / k.sum()).to(dtype=x.dtype, device=x.device)
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    y = y.reshape(b, c, h, w).clamp(0.0, 1.0)
    return y if images.ndim == 4 else y[0]


CORRUPTIONS: dict[str, Corruption] = {
    fn.__name__: fn for fn in (gaussian_noise, shot_noise, impulse_noise, gaussian_blur)
}

#: severity levels per corruption (on the scales documented above), mildest first
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.05, 0.1, 0.2, 0.3, 0.4),
    "shot_noise": (0.05, 0.1, 0.2, 0.3, 0.4),
    "impulse_noise": (0.01, 0.03, 0.05, 0.1, 0.2),
    "gaussian_blur": (0.5, 1.0, 1.5, 2.0, 3.0),
}


def corruption_seed(seed: int, name: str, level: float) -> int:
    """The generator seed :func:`corrupt` uses: a stable mix of ``seed``, ``name`` and ``level``."""
    tag = zlib.crc32(f"{name}@{float(level)!r}".encode())
    return (int(seed) * 1_000_003 + tag) % (2**63 - 1)


def corrupt(images: Tensor, name: str, level: float, seed: int = 0) -> Tensor:
    """Apply corruption ``name`` at ``level``; same (seed, name, level) -> same output on any device."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    generator = torch.Generator(device="cpu").manual_seed(corruption_seed(seed, name, level))
    return CORRUPTIONS[name](images, level, generator)
