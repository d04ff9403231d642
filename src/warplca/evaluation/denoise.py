"""Experiment 3 — denoising (README, "Experiments and reports").

Clean [0, 1] images get additive Gaussian noise of std σ (``warplca.data.corrupt``, clamped to
[0, 1], seeded). Cold LCA and WARP-LCA code the *noisy* image; the reconstruction Φa, mapped back to
pixels, is compared with the *clean* image (PSNR/SSIM, ``data_range=1.0``). The noisy input itself is
the baseline. The sparse code acts as the denoiser: a good minimum keeps structure and drops noise.
Each (σ, condition) is one traced run up to the largest budget; quality is read at the log-spaced
checkpoints, the table at the budgets, and the best PSNR over all checkpoints is reported too
(LCA denoising often peaks before convergence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from warplca.evaluation.common import METHODS, EvalModel, ExperimentResult, describe_model, pixel_quality
from warplca.evaluation.convergence import Curves, measure
from warplca.evaluation.examples import plot_examples
from warplca.evaluation.report import fmt, markdown_table, write_csv

__all__ = ["evaluate_denoise", "plot_denoise", "sigma_key"]

COLUMNS = ["sigma", "method", "k", "psnr", "ssim", "energy", "l0"]


def sigma_key(sigma: float) -> str:
    """``0.1`` -> ``sigma0.1`` (the metric-name fragment of a noise level)."""
    return f"sigma{float(sigma):g}"


def plot_denoise(
    curves: dict[float, dict[str, Curves]], noisy: dict[float, tuple[float, float]], title: str = ""
) -> Any:
    """PSNR (top) and SSIM (bottom) vs iterations per σ; the noisy input as a dotted baseline."""
    import matplotlib.pyplot as plt

    sigmas = sorted(curves)
    fig, axes = plt.subplots(2, len(sigmas), figsize=(4.2 * len(sigmas), 7), squeeze=False)
    colors = {"cold": "tab:blue", "warm": "tab:orange"}
    for j, sigma in enumerate(sigmas):
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row, j]
            for method, c in curves[sigma].items():
                ks = [k for k in c.ks if k >= 1]
                vals = getattr(c, metric)[[c.ks.index(k) for k in ks]].mean(1).numpy()
                ax.plot(ks, vals, "o-", ms=3, color=colors.get(method), label=METHODS.get(method, method))
            ax.axhline(noisy[sigma][row], color="gray", ls=":", label="noisy input")
            ax.set_xscale("log")
            ax.set_xlabel("LCA iterations")
            ax.set_ylabel("PSNR (dB) vs clean" if metric == "psnr" else "SSIM vs clean")
            ax.set_title(f"σ = {sigma:g}: {'PSNR' if metric == 'psnr' else 'SSIM'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title or "Denoising: reconstruction of the noisy image vs the clean image")
    fig.tight_layout()
    return fig


def evaluate_denoise(
    model: EvalModel,
    images: Tensor,
    out_dir: str | Path,
    *,
    sigmas: Sequence[float] = (0.05, 0.1, 0.2),
    budgets: Sequence[int] = (10, 100, 1000),
    batch_size: int = 64,
    seed: int = 0,
    examples: int = 4,
    prefix: str = "denoise",
    show_progress: bool = True,
    device: torch.device | None = None,
) -> ExperimentResult:
    """Denoise Gaussian-noise versions of ``images`` with cold LCA and WARP-LCA; write CSV/PNG.

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets + noisy baseline),
    ``<prefix>.png`` (curves), ``<prefix>_examples.png`` (middle σ). Metrics:
    ``<prefix>/sigma<σ>/noisy/psnr``, ``<prefix>/sigma<σ>/<cold|warm>/<psnr|ssim>@<k>``,
    ``<prefix>/sigma<σ>/<cold|warm>/best_psnr`` (+ ``best_k``).
    """
    from warplca.data import corrupt
    from warplca.plotting import save_png

    out_dir = Path(out_dir)
    budgets = sorted({int(b) for b in budgets if int(b) >= 1})
    if not budgets:
        raise ValueError("denoise needs at least one iteration budget >= 1")
    total = budgets[-1]
    sigmas = [float(s) for s in sigmas]
    show_sigma = sigmas[len(sigmas) // 2] if sigmas else None
    keep = min(int(examples), images.shape[0])
    curves: dict[float, dict[str, Curves]] = {}
    noisy_q: dict[float, tuple[float, float]] = {}
    noisy_examples: Tensor | None = None
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    metrics: dict[str, float] = {f"{prefix}/n_images": float(images.shape[0])}
    for sigma in sigmas:
        noisy = corrupt(images, "gaussian_noise", sigma, seed=seed)
        p, s = pixel_quality(noisy, images)
        noisy_q[sigma] = (float(p.mean()), float(s.mean()))
        base = {
            "sigma": sigma,
            "method": "noisy",
            "k": None,
            "psnr": noisy_q[sigma][0],
            "ssim": noisy_q[sigma][1],
        }
        rows.append(base)
        table.append(dict(base))
        key = f"{prefix}/{sigma_key(sigma)}"
        metrics[f"{key}/noisy/psnr"], metrics[f"{key}/noisy/ssim"] = noisy_q[sigma]
        keep_here = keep if sigma == show_sigma else 0
        if keep_here:
            noisy_examples = noisy[:keep_here]
        curves[sigma], _ = measure(
            model,
            noisy,
            total,
            budgets,
            target=images,
            batch_size=batch_size,
            keep=keep_here,
            keep_ks=budgets if keep_here else (),
            device=device,
            show_progress=show_progress,
            name=f"σ={sigma:g}",
        )
        for method, c in curves[sigma].items():
            for k in c.ks:
                at = c.at(k)
                row = {
                    "sigma": sigma,
                    "method": method,
                    "k": k,
                    "psnr": at["psnr"],
                    "ssim": at["ssim"],
                    "energy": at["energy"],
                    "l0": at["l0"],
                }
                rows.append(row)
                if k in budgets:
                    table.append(dict(row))
                    metrics[f"{key}/{method}/psnr@{k}"] = at["psnr"]
                    metrics[f"{key}/{method}/ssim@{k}"] = at["ssim"]
            mean_psnr = c.psnr.mean(1)
            j = int(torch.argmax(mean_psnr))
            metrics[f"{key}/{method}/best_psnr"] = float(mean_psnr[j])
            metrics[f"{key}/{method}/best_k"] = float(c.ks[j])

    files: dict[str, Path] = {}
    info = describe_model(model)
    h, w = images.shape[-2:]
    title = (
        f"Denoising — {images.shape[0]} images {h}×{w}, {info['threshold']} threshold, λ={fmt(info['lam'])}"
    )
    files["csv"] = write_csv(out_dir / f"{prefix}.csv", rows, COLUMNS)
    files["table"] = write_csv(out_dir / f"{prefix}_table.csv", table, COLUMNS)
    files["plot"] = save_png(plot_denoise(curves, noisy_q, title), out_dir / f"{prefix}.png")
    if keep and show_sigma is not None and noisy_examples is not None:
        recons: dict[str, Tensor] = {f"noisy σ={show_sigma:g}": noisy_examples}
        for k in budgets:
            for method, c in curves[show_sigma].items():
                recons[f"{METHODS[method]} @ {k}"] = c.kept[k]
        files["examples"] = save_png(
            plot_examples(images[:keep], recons, None, title + f", σ = {show_sigma:g}"),
            out_dir / f"{prefix}_examples.png",
        )

    shown = [
        dict(r, method=METHODS.get(r["method"], "noisy input"), k=r["k"] if r["k"] is not None else "–")
        for r in table
    ]
    best = []
    for sigma in sigmas:
        for method in ("cold", "warm"):
            key = f"{prefix}/{sigma_key(sigma)}/{method}"
            best.append(
                {
                    "sigma": sigma,
                    "method": METHODS[method],
                    "best_psnr": metrics[f"{key}/best_psnr"],
                    "best_k": int(metrics[f"{key}/best_k"]),
                }
            )
    md = [
        "## Denoising",
        "",
        f"{title}. Gaussian noise σ ∈ {{{', '.join(f'{s:g}' for s in sigmas)}}} on [0, 1] pixels (clamped, "
        f"seed {seed}); LCA codes the noisy image, PSNR/SSIM compare its reconstruction with the clean one.",
        "",
        markdown_table(
            shown,
            ["sigma", "method", "k", "psnr", "ssim", "energy", "l0"],
            ["σ", "method", "iterations", "PSNR (dB)", "SSIM", "energy", "ℓ0 / image"],
        ),
        "Best PSNR over the checkpoints (early stopping as a denoiser):",
        "",
        markdown_table(
            best, ["sigma", "method", "best_psnr", "best_k"], ["σ", "method", "best PSNR (dB)", "at k"]
        ),
    ]
    md += [
        f"![{label}]({files[k].name})"
        for k, label in (("plot", "denoising curves"), ("examples", "examples"))
        if k in files
    ]
    gains = [
        metrics[f"{prefix}/{sigma_key(s)}/warm/psnr@{total}"]
        - metrics[f"{prefix}/{sigma_key(s)}/cold/psnr@{total}"]
        for s in sigmas
    ]
    if gains:
        metrics[f"{prefix}/warm_minus_cold_psnr@{total}"] = float(sum(gains) / len(gains))
    if any(math.isnan(g) for g in gains):
        md.append("\nSome PSNR values are undefined (NaN).")
    tables = {f"{prefix}/curves": (COLUMNS, rows)}
    return ExperimentResult(
        name=prefix, metrics=metrics, markdown="\n".join(md) + "\n", files=files, tables=tables
    )
