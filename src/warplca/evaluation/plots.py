"""Figures of the experiments, drawn from measured :class:`~warplca.evaluation.curves.Curves`.

Every function returns a matplotlib figure and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from warplca.evaluation.common import METHODS
from warplca.evaluation.curves import Curves

__all__ = [
    "finish_figure", "plot_convergence", "plot_denoise", "plot_sets", "plot_speedup", "style_iteration_axes",
]

COLORS = {"cold": "tab:blue", "warm": "tab:orange"}
#: panels of :func:`plot_sets`: metric -> (y label, title)
SET_PANELS = {
    "energy_norm": ("energy / (C·H·W)", "Energy per pixel value"),
    "rel_energy": ("E_k / E_cold(T)", "Energy relative to cold LCA at T"),
    "psnr": ("PSNR (dB)", "PSNR vs clean image"),
    "l0_frac": ("ℓ0 fraction", "Active fraction of the code"),
}


def finish_figure(fig: Any, title: str) -> Any:
    """Give ``fig`` its suptitle and a tight layout; returns it."""
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def style_iteration_axes(panels: Iterable[tuple[Any, str, str]], legend_size: float = 7) -> None:
    """Log-x "LCA iterations" axes with a y label, title, grid and legend, for (ax, ylabel, title) panels."""
    for ax, ylabel, title in panels:
        ax.set(xscale="log", xlabel="LCA iterations", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_size)


def plot_convergence(curves: Mapping[str, Curves], title: str = "",
                     match: Mapping[str, Any] | None = None) -> Any:
    """2×2 figure: energy, PSNR, SSIM and ℓ0 (means over images) against iterations, log x."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for method, c in curves.items():
        it = torch.arange(1, c.total + 1).numpy()
        style = {"label": METHODS.get(method, method), "color": COLORS.get(method)}
        axes[0, 0].plot(it, c.energy[1:].mean(1).numpy(), **style)
        axes[0, 1].plot(*c.checkpoint_means("psnr"), "o-", ms=3, **style)
        axes[1, 0].plot(*c.checkpoint_means("ssim"), "o-", ms=3, **style)
        axes[1, 1].plot(it, c.l0[1:].mean(1).numpy(), **style)
    if "cold" in curves:
        axes[0, 0].axhline(float(curves["cold"].energy[-1].mean()), color="gray", ls=":", lw=1,
                           label=f"cold energy at T={curves['cold'].total}")
    k = math.nan if match is None else match["iterations_to_match"]
    if not math.isnan(k) and k >= 1:
        axes[0, 0].axvline(k, color="tab:green", ls="--", lw=1, label=f"iterations-to-match = {int(k)}")
    labels = [("energy (mean per image)", "Energy ½‖x − Φa‖² + ΣP(a)"), ("PSNR (dB)", "PSNR vs clean image"),
              ("SSIM", "SSIM vs clean image"), ("active coefficients ℓ0 per image", "Sparsity")]
    style_iteration_axes(((ax, *lab) for ax, lab in zip(axes.flat, labels, strict=True)), legend_size=8)
    energies = torch.cat([c.energy[1:].mean(1) for c in curves.values()])
    if bool((energies > 0).all()) and float(energies.max() / energies.min()) > 20:
        axes[0, 0].set_yscale("log")
    return finish_figure(fig, title or "Cold LCA vs WARP-LCA")


def plot_speedup(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Equal-energy iterations, log–log: x = WARP-LCA iterations, y = cold iterations to the same mean energy.

    Line + 25–75 % band: warm-budget rows; hollow squares: cold-budget rows; diagonals: 1×, 10×, 100×
    speed-ups; "never within T": a triangle at T pointing out of the plot.
    """
    import matplotlib.pyplot as plt

    warm = [r for r in rows if r["budget"] == "warm" and int(r["k"]) >= 1]
    cold = [r for r in rows if r["budget"] == "cold"]
    total = int(rows[0]["T"]) if rows else 1
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    clip = lambda v: min(max(float(v), 1.0), float(total))  # noqa: E731 - the log axes span [1, T]
    if warm:
        ax.fill_between([int(r["k"]) for r in warm], [clip(r["q25_iterations"]) for r in warm],
                        [clip(r["q75_iterations"]) for r in warm], color="tab:orange", alpha=0.2, lw=0,
                        label="per image: 25–75 % (clipped to [1, T])")
        ok = [(int(r["k"]), float(r["cold_iterations"])) for r in warm
              if 1 <= float(r["cold_iterations"]) < math.inf]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o-", color="tab:orange", ms=4,
                    label="WARP-LCA budget k → cold iterations (mean energy)")
        never = [int(r["k"]) for r in warm if math.isinf(float(r["cold_iterations"]))]
        if never:
            ax.plot(never, [total] * len(never), "^", color="tab:red", ms=8,
                    label=f"cold LCA never reaches it within T = {total}")
    pts = [(clip(r["warm_iterations"]), int(r["k"])) for r in cold
           if math.isfinite(float(r["warm_iterations"]))]
    if pts:
        ax.plot(*zip(*pts, strict=True), "s", mfc="none", color="tab:blue", ms=6,
                label="cold budget → WARP-LCA iterations (mean energy; 0 drawn at 1)")
    never = [int(r["k"]) for r in cold if math.isinf(float(r["warm_iterations"]))]
    if never:
        ax.plot([total] * len(never), never, ">", color="tab:purple", ms=8,
                label=f"WARP-LCA never reaches it within T = {total}")
    span = [1.0, float(total)]
    for factor, style, alpha in ((1, ":", 0.8), (10, "--", 0.4), (100, "--", 0.4)):
        ax.plot(span, [v * factor for v in span], style, color="gray", lw=0.8, alpha=alpha)
        if factor <= total:
            ax.annotate(f"{factor}×" if factor > 1 else "1× (y = x)", (1.05, factor * 1.05), color="gray",
                        fontsize=8)
    ax.axhline(total, color="gray", lw=0.8, alpha=0.5)
    ax.set(xscale="log", yscale="log", xlim=(0.8, total * 1.25), ylim=(0.8, total * 1.6),
           xlabel="WARP-LCA iterations k", ylabel="cold LCA iterations to the same mean energy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # below y = x: WARP-LCA slower than cold, rarely any data
    ax.set_title(title or "Equal-energy speed-up of WARP-LCA over cold LCA", fontsize=10)
    fig.tight_layout()
    return fig


def plot_sets(curves: Mapping[str, Mapping[str, Curves]], panels: Sequence[str], title: str,
              figsize: tuple[float, float]) -> Any:
    """One panel per metric of :data:`SET_PANELS` against iterations, one colour per image set (or
    threshold), dashed = cold LCA, solid = WARP-LCA; ``rel_energy`` is relative to each set's cold energy
    at T."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, (name, cond) in enumerate(curves.items()):
        ref = float(cond["cold"].energy[-1].mean())
        for method, c in cond.items():
            style = {"ls": "--" if method == "cold" else "-", "color": cmap(i % 10),
                     "label": f"{name} — {METHODS.get(method, method)}"}
            it = torch.arange(1, c.total + 1).numpy()
            e = c.energy[1:]
            trace = {"energy_norm": (e / c.numel).mean(1), "rel_energy": e.mean(1) / ref,
                     "l0_frac": (c.l0[1:] / c.code_numel).mean(1)}
            for ax, panel in zip(axes[0], panels, strict=True):
                if panel == "psnr":
                    ax.plot(*c.checkpoint_means("psnr"), marker="o", ms=3, **style)
                else:
                    ax.plot(it, trace[panel].numpy(), **style)
    if "rel_energy" in panels:
        axes[0][list(panels).index("rel_energy")].axhline(1.0, color="gray", ls=":", lw=1)
    style_iteration_axes((ax, *SET_PANELS[p]) for ax, p in zip(axes[0], panels, strict=True))
    return finish_figure(fig, title + " (dashed: cold LCA, solid: WARP-LCA)")


def plot_denoise(curves: Mapping[float, Mapping[str, Curves]], noisy: Mapping[float, tuple[float, float]],
                 title: str = "") -> Any:
    """PSNR (top) and SSIM (bottom) vs iterations per σ; the noisy input as a dotted baseline."""
    import matplotlib.pyplot as plt

    sigmas = sorted(curves)
    fig, axes = plt.subplots(2, len(sigmas), figsize=(4.2 * len(sigmas), 7), squeeze=False)
    panels = []
    for j, sigma in enumerate(sigmas):
        for row, (metric, name, unit) in enumerate((("psnr", "PSNR", " (dB)"), ("ssim", "SSIM", ""))):
            ax = axes[row, j]
            for method, c in curves[sigma].items():
                ax.plot(*c.checkpoint_means(metric), "o-", ms=3, color=COLORS.get(method),
                        label=METHODS.get(method, method))
            ax.axhline(noisy[sigma][row], color="gray", ls=":", label="noisy input")
            panels.append((ax, f"{name}{unit} vs clean", f"σ = {sigma:g}: {name}"))
    style_iteration_axes(panels, legend_size=8)
    return finish_figure(fig, title or "Denoising: reconstruction of the noisy image vs the clean image")
