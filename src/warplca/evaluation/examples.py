"""Example figures: images next to their cold / warm reconstructions and code-energy maps; atom grids.

The code-energy map Σ_k a_k² at each code position shows where the code spends its activity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from warplca.evaluation.common import EvalModel, pixel_quality, to_pixels
from warplca.evaluation.plots import finish_figure

__all__ = ["examples_figure", "plot_atoms", "plot_examples"]


def _show(ax: Any, img: Tensor) -> None:
    """A (C, H, W) [0, 1] image on ``ax`` (grey for one channel)."""
    arr = img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    gray = arr.shape[-1] == 1
    ax.imshow(arr[..., 0] if gray else arr, cmap="gray" if gray else None, vmin=0, vmax=1,
              interpolation="nearest")


def plot_examples(images: Tensor, recons: Mapping[str, Tensor], codes: Mapping[str, Tensor] | None = None,
                  title: str = "") -> Any:
    """A grid, one row per image (n, C, H, W): the image, each reconstruction (column title -> [0, 1]
    images, PSNR under each) and each code (column title -> (n, K, H', W') activations, as Σa² maps on a
    shared colour scale per row, ℓ0 under each)."""
    import matplotlib.pyplot as plt

    codes = dict(codes or {})
    n = min(images.shape[0], *(r.shape[0] for r in recons.values()), *(c.shape[0] for c in codes.values()))
    ncol = 1 + len(recons) + len(codes)
    fig, axes = plt.subplots(n, ncol, figsize=(1.9 * ncol, 1.9 * n + 0.7), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        for j, rec in enumerate(recons.values(), start=1):
            _show(axes[i, j], rec[i])
            p, _ = pixel_quality(rec[i : i + 1], images[i : i + 1])
            axes[i, j].set_xlabel(f"PSNR {float(p):.1f} dB", fontsize=8)
        maps = [c[i].detach().cpu().pow(2).sum(0) for c in codes.values()]
        vmax = max([float(m.max()) for m in maps] + [1e-12])
        for j, (c, m) in enumerate(zip(codes.values(), maps, strict=True), start=1 + len(recons)):
            axes[i, j].imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            axes[i, j].set_xlabel(f"ℓ0 = {int(torch.count_nonzero(c[i]))}", fontsize=8)
    for j, name in enumerate(["image", *recons, *codes]):
        axes[0, j].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    return finish_figure(fig, title or "Reconstructions and code-energy maps (Σa²)")


@torch.no_grad()
def examples_figure(model: EvalModel, images: Tensor, iters: Sequence[int] = (10, 1000),
                    title: str = "") -> Any:
    """:func:`plot_examples` of cold LCA and WARP-LCA on ``images`` at each budget in ``iters`` (codes at
    the largest)."""
    images = images.to(model.dictionary.weight.device)
    x = model.preprocess(images)
    recons: dict[str, Tensor] = {}
    codes: dict[str, Tensor] = {}
    last = max(iters)
    for k in iters:
        for warm, label in ((False, "LCA"), (True, "WARP-LCA")):
            res = model(x, iters=int(k), warm=warm)
            recons[f"{label} @ {k}"] = to_pixels(model, res.recon, images).cpu()
            if k == last:
                codes[f"Σa² {label} @ {k}"] = res.a.cpu()
    return plot_examples(images.cpu(), recons, codes, title)


def plot_atoms(weight: Tensor, title: str = "") -> Any:
    """The dictionary atoms as one tiled image, enlarged (nearest neighbour) for legibility."""
    import matplotlib.pyplot as plt

    from warplca.plotting import atom_grid

    grid = atom_grid(weight.detach().cpu())
    side = max(3.0, min(10.0, grid.shape[1] / 12))
    fig, ax = plt.subplots(figsize=(side, side * grid.shape[0] / grid.shape[1] + 0.5))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    n, c, k, _ = weight.shape
    ax.set_title(title or f"Dictionary: {n} atoms of {c}×{k}×{k}")
    fig.tight_layout()
    return fig
