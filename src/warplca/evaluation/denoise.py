"""Experiment 3 — denoising (README, "Experiments and reports").

Cold LCA and WARP-LCA code noisy images (Gaussian σ); PSNR/SSIM compare the reconstruction with the
*clean* image. The best PSNR over the checkpoints is reported too: LCA denoising often peaks early.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from warplca.data import corrupt
from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    Figure,
    describe_model,
    pixel_quality,
)
from warplca.evaluation.curves import Curves, curve_rows, measure, row_metrics
from warplca.evaluation.examples import plot_examples
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.plots import plot_denoise
from warplca.evaluation.report import fmt, markdown_table
from warplca.settings import Annotated, Checked, Doc, Ge, Gt, Le, NonEmpty

__all__ = ["denoise_evaluation", "measure_denoise", "sigma_key"]

COLUMNS = ["sigma", "method", "k", "psnr", "ssim", "energy", "l0"]


def sigma_key(sigma: float) -> str:
    """``0.1`` -> ``sigma0.1`` (the metric-name fragment of a noise level)."""
    return f"sigma{float(sigma):g}"


def measure_denoise(model: EvalModel, images: Tensor, *, sigmas: Sequence[float] = (0.05, 0.1, 0.2),
                    budgets: Sequence[int] = (10, 100, 1000), batch_size: int = 64, seed: int = 0,
                    examples: int = 4, prefix: str = "denoise", show_progress: bool = True,
                    device: torch.device | None = None) -> ExperimentResult:
    """Denoise Gaussian-noise versions of ``images`` with cold LCA and WARP-LCA.

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets + noisy baseline),
    ``<prefix>.png`` (curves), ``<prefix>_examples.png`` (middle σ). Metrics:
    ``<prefix>/sigma<σ>/noisy/psnr``, ``<prefix>/sigma<σ>/<cold|warm>/<psnr|ssim>@<k>``,
    ``<prefix>/sigma<σ>/<cold|warm>/best_psnr`` (+ ``best_k``), ``<prefix>/warm_minus_cold_psnr@<T>``.
    """
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
    best: list[dict[str, Any]] = []
    metrics: dict[str, float] = {f"{prefix}/n_images": float(images.shape[0])}
    for sigma in sigmas:
        noisy = corrupt(images, "gaussian_noise", sigma, seed=seed)
        p, s = pixel_quality(noisy, images)
        noisy_q[sigma] = (float(p.mean()), float(s.mean()))
        key = f"{prefix}/{sigma_key(sigma)}"
        metrics[f"{key}/noisy/psnr"], metrics[f"{key}/noisy/ssim"] = noisy_q[sigma]
        keep_here = keep if sigma == show_sigma else 0
        if keep_here:
            noisy_examples = noisy[:keep_here]
        curves[sigma], _ = measure(
            model, noisy, total, budgets, name=f"σ={sigma:g}", target=images, batch_size=batch_size,
            keep=keep_here, keep_ks=budgets if keep_here else (), device=device, show_progress=show_progress)
        base = {"sigma": sigma, "method": "noisy", "k": None, "psnr": noisy_q[sigma][0],
                "ssim": noisy_q[sigma][1]}
        mine = curve_rows(curves[sigma], {"sigma": sigma})
        at_budgets = [r for r in mine if r["k"] in budgets]
        rows += [base, *mine]
        table += [base, *at_budgets]
        metrics.update(row_metrics(key, at_budgets, ("psnr", "ssim")))
        for method, c in curves[sigma].items():
            mean_psnr = c.psnr.mean(1)
            j = int(torch.argmax(mean_psnr))
            best.append({"sigma": sigma, "method": METHODS[method], "best_psnr": float(mean_psnr[j]),
                         "best_k": c.ks[j]})
            metrics.update({f"{key}/{method}/{n}": float(best[-1][n]) for n in ("best_psnr", "best_k")})
    gains = [metrics[f"{key}/warm/psnr@{total}"] - metrics[f"{key}/cold/psnr@{total}"]
             for key in (f"{prefix}/{sigma_key(s)}" for s in sigmas)]
    if gains:
        metrics[f"{prefix}/warm_minus_cold_psnr@{total}"] = float(sum(gains) / len(gains))

    info = describe_model(model)
    h, w = images.shape[-2:]
    title = (f"Denoising — {images.shape[0]} images {h}×{w}, {info['threshold']} threshold, "
             f"λ={fmt(info['lam'])}")
    figures = {"plot": Figure(f"{prefix}.png", "denoising curves",
                              lambda: plot_denoise(curves, noisy_q, title))}
    if keep and show_sigma is not None and noisy_examples is not None:
        recons: dict[str, Tensor] = {f"noisy σ={show_sigma:g}": noisy_examples}
        recons.update({f"{METHODS[m]} @ {k}": c.kept[k]
                       for k in budgets for m, c in curves[show_sigma].items()})
        figures["examples"] = Figure(f"{prefix}_examples.png", "examples", lambda: plot_examples(
            images[:keep], recons, None, title + f", σ = {show_sigma:g}"))
    shown = [dict(r, method=METHODS.get(r["method"], "noisy input"), k=r["k"] if r["k"] is not None else "–")
             for r in table]
    md = [
        "## Denoising", "",
        f"{title}. Gaussian noise σ ∈ {{{', '.join(f'{s:g}' for s in sigmas)}}} on [0, 1] pixels (clamped, "
        f"seed {seed}); LCA codes the noisy image, PSNR/SSIM compare its reconstruction with the clean one.",
        "",
        markdown_table(shown, COLUMNS,
                       ["σ", "method", "iterations", "PSNR (dB)", "SSIM", "energy", "ℓ0 / image"]),
        "Best PSNR over the checkpoints (early stopping as a denoiser):", "",
        markdown_table(best, ["sigma", "method", "best_psnr", "best_k"],
                       ["σ", "method", "best PSNR (dB)", "at k"]),
        *(f.link for f in figures.values()),
    ]
    if any(math.isnan(g) for g in gains):
        md.append("\nSome PSNR values are undefined (NaN).")
    return ExperimentResult.from_lines(
        prefix, md, metrics=metrics, figures=figures, tables={f"{prefix}/curves": (COLUMNS, rows)},
        csv={f"{prefix}.csv": (COLUMNS, rows), f"{prefix}_table.csv": (COLUMNS, table)})


@dataclass(frozen=True)
class DenoiseSettings(Checked):
    """``eval.denoise``: Gaussian noise levels σ, the budgets tabulated and the example images."""

    sigmas: Annotated[Sequence[float], Gt(0), Le(1), NonEmpty(), Doc("σ on the [0, 1] pixel scale")] = (
        0.05, 0.1, 0.2)
    budgets: Annotated[Sequence[int], Ge(1), NonEmpty()] = (10, 100, 1000)
    examples: Annotated[int, Ge(0)] = 4


@evaluation("denoise", DenoiseSettings)
def denoise_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=denoise``: experiment 3 on the run's model and images (settings: ``eval.denoise``)."""
    conf = session.settings["denoise"]
    return measure_denoise(session.model, session.images, sigmas=conf["sigmas"], budgets=conf["budgets"],
                           seed=int(session.cfg.get("seed") or 0), examples=int(conf["examples"]),
                           **session.run_kwargs())
