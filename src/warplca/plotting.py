"""Figures: atom grids, image grids and PNG output (headless). Grids are float32 (H, W, 3) numpy
arrays in [0, 1], what every logger and :func:`save_png` take."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["atom_grid", "image_grid", "save_png"]


def _cpu(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x if isinstance(x, Tensor) else np.asarray(x)).detach().to("cpu", torch.float32)


def _tile(tiles: Tensor, ncol: int | None, pad: int) -> np.ndarray:
    """Tile (N, C, h, w) values in [0, 1] into one (H, W, 3) float32 array (white padding)."""
    n, c, h, w = tiles.shape
    tiles = tiles.expand(-1, 3, -1, -1) if c == 1 else tiles
    ncol = max(1, min(n, ncol if ncol else math.ceil(math.sqrt(n))))
    nrow = math.ceil(n / ncol)
    grid = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 1.0)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = tiles[i]
    return grid.permute(1, 2, 0).contiguous().numpy()


def atom_grid(weight: Tensor | np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Dictionary atoms (n_atoms, C, k, k) as one (H, W, 3) float image in [0, 1]: each scaled by its own
    max |value| around 0 = mid-grey (signs stay visible); C ∉ {1, 3} is shown channel-averaged."""
    w = _cpu(weight)
    if w.dim() != 4:
        raise ValueError(f"weight must have shape (n_atoms, C, k, k), got {tuple(w.shape)}")
    w = w if w.shape[1] in (1, 3) else w.mean(dim=1, keepdim=True)
    scale = w.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return _tile(0.5 + 0.5 * w / scale, ncol, pad)


def image_grid(images: Tensor | np.ndarray, ncol: int | None = None, pad: int = 1,
               value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Images (N, C, H, W) (C = 1 or 3) as one (H, W, 3) float image, values clipped to ``value_range``."""
    t = _cpu(images)
    t = t.unsqueeze(1) if t.dim() == 3 else t
    if t.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(t.shape)}")
    if t.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels to be shown as images, got {t.shape[1]}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    return _tile(((t - lo) / (hi - lo)).clamp(0.0, 1.0), ncol, pad)


def save_png(image: Any, path: str | os.PathLike, dpi: int = 120, upscale: int = 1) -> Path:
    """Write an (H, W, 3) / (H, W) array (float in [0, 1] or uint8) or a matplotlib Figure to ``path``,
    atomically; ``upscale`` repeats every pixel n×n times, so small grids stay legible."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        if isinstance(image, Figure):
            image.savefig(tmp, dpi=dpi, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(image)
        else:
            arr = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image)
            if arr.dtype != np.uint8:
                arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
            if arr.ndim not in (2, 3):
                raise ValueError(f"save_png expects an (H, W) or (H, W, 3) array, got shape {arr.shape}")
            if upscale > 1:
                arr = np.repeat(np.repeat(arr, int(upscale), axis=0), int(upscale), axis=1)
            if arr.ndim == 2:
                mpimg.imsave(tmp, arr, cmap="gray", vmin=0, vmax=255 if arr.dtype == np.uint8 else 1)
            else:
                mpimg.imsave(tmp, arr)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
