"""Experiment 3 — denoising (README, "Experiments and reports").

Cold LCA and WARP-LCA code noisy images (Gaussian σ); PSNR/SSIM compare the reconstruction with the
*clean* image. The best PSNR over the checkpoints is reported too: LCA denoising often peaks early.
"""

from __future__ import annotations

import copy
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
from warplca.evaluation.curves import Curves, curve_rows, measure, row_metrics, run_curves
from warplca.evaluation.examples import plot_examples
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.plots import plot_denoise
from warplca.evaluation.report import fmt, markdown_table
from warplca.settings import Annotated, Checked, Doc, Ge, Gt, Le, NonEmpty

__all__ = ["at_lambda", "denoise_evaluation", "measure_denoise", "select_lambda", "sigma_key"]

COLUMNS = ["sigma", "method", "k", "psnr", "ssim", "energy", "l0"]


def sigma_key(sigma: float) -> str:
    """``0.1`` -> ``sigma0.1`` (the metric-name fragment of a noise level)."""
    return f"sigma{float(sigma):g}"


def at_lambda(model: EvalModel, lam: float) -> EvalModel:
    """``model`` with its solver at threshold level ``lam`` (dictionary, predictor and the rest shared)."""
    from warplca.lca import LCA

    other = copy.copy(model)
    other.lca = LCA(model.dictionary, **{**model.lca.settings(), "lam": float(lam)})
    return other


def select_lambda(model: EvalModel, clean: Tensor, sigma: float, lams: Sequence[float], warm: bool,
                  ks: Sequence[int], *, seed: int = 0, batch_size: int = 64,
                  device: torch.device | None = None) -> tuple[float, int, list[dict[str, Any]]]:
    """The (λ, k) with the best mean PSNR on ``clean`` images (selection images, e.g. val) with noise σ,
    over the λ candidates and the checkpoints ``ks`` (early stopping is part of the choice); returns
    λ, k and one row per candidate (its best k and PSNR)."""
    noisy = corrupt(clean, "gaussian_noise", sigma, seed=seed + 1)  # other noise than the test images'
    rows, best = [], (-math.inf, float(lams[0]), int(ks[-1]))
    for lam in lams:
        c = run_curves(at_lambda(model, lam), noisy, ks, warm, target=clean, batch_size=batch_size,
                       device=device, show_progress=False)
        psnr = c.psnr.mean(1)
        j = int(torch.argmax(psnr))
        rows.append({"sigma": sigma, "method": "warm" if warm else "cold", "lam": float(lam),
                     "best_k": c.ks[j], "val_psnr": float(psnr[j])})
        if float(psnr[j]) > best[0]:
            best = (float(psnr[j]), float(lam), c.ks[j])
    return best[1], best[2], rows


def measure_denoise(model: EvalModel, images: Tensor, *, sigmas: Sequence[float] = (0.05, 0.1, 0.2),
                    budgets: Sequence[int] = (10, 100, 1000), batch_size: int = 64, seed: int = 0,
                    examples: int = 4, prefix: str = "denoise", show_progress: bool = True,
                    device: torch.device | None = None, select_images: Tensor | None = None,
                    lam_factors: Sequence[float] = ()) -> ExperimentResult:
    """Denoise Gaussian-noise versions of ``images`` with cold LCA and WARP-LCA.

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets + noisy baseline),
    ``<prefix>.png`` (curves), ``<prefix>_examples.png`` (middle σ). Metrics:
    ``<prefix>/sigma<σ>/noisy/psnr``, ``<prefix>/sigma<σ>/<cold|warm>/<psnr|ssim>@<k>``,
    ``<prefix>/sigma<σ>/<cold|warm>/best_psnr`` (+ ``best_k``), ``<prefix>/warm_minus_cold_psnr@<T>``.

    As a user would run it (``select_images``, e.g. val, and ``lam_factors``): per σ and method, λ among
    ``lam_factors`` × the model's λ and the stopping k chosen on the selection images (:func:`select_lambda`),
    then measured on ``images``; cold LCA at the model's λ with k chosen the same way is the early-stopped
    baseline. Adds ``<prefix>_tuned.csv``, ``<prefix>_selection.csv`` and metrics
    ``<prefix>/sigma<σ>/tuned/<early_stopped_cold|cold|warm>/<psnr|ssim|lam|k>``.
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
    tuned: list[dict[str, Any]] = []
    selection: list[dict[str, Any]] = []
    if select_images is not None and lam_factors:
        tuned, selection = _tuned(model, images, select_images, sigmas, budgets, lam_factors, seed,
                                  batch_size, device, show_progress)
        for r in tuned:
            key = f"{prefix}/{sigma_key(r['sigma'])}/tuned/{r['key']}"
            metrics.update({f"{key}/{m}": float(r[m]) for m in ("psnr", "ssim", "lam", "k")})
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
        *_tuned_markdown(tuned, budgets),
    ]
    if any(math.isnan(g) for g in gains):
        md.append("\nSome PSNR values are undefined (NaN).")
    return ExperimentResult.from_lines(
        prefix, md, metrics=metrics, figures=figures, tables={f"{prefix}/curves": (COLUMNS, rows)},
        csv={f"{prefix}.csv": (COLUMNS, rows), f"{prefix}_table.csv": (COLUMNS, table),
             **({f"{prefix}_tuned.csv": (list(tuned[0]), tuned),
                 f"{prefix}_selection.csv": (list(selection[0]), selection)} if tuned else {})})


TUNED = {"early_stopped_cold": "LCA (cold), λ as trained, k chosen on val",
         "cold": "LCA (cold), λ and k chosen on val", "warm": "WARP-LCA, λ and k chosen on val"}


def _tuned(model: EvalModel, images: Tensor, select: Tensor, sigmas: Sequence[float], budgets: Sequence[int],
           factors: Sequence[float], seed: int, batch_size: int, device: torch.device | None,
           show_progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per σ: the early-stopped cold baseline and each method at its own (λ, k) chosen on ``select``,
    measured on ``images`` (test) at that k and at every budget."""
    from warplca.evaluation.common import log_spaced_ks, progress

    total = max(budgets)
    grid = sorted({*log_spaced_ks(total), *budgets})
    lam0 = float(model.lca.lam)
    rows, selection = [], []
    bar = progress(len(sigmas) * (1 + 2 * len(factors)), "denoise: λ and k on val", show_progress)
    for sigma in sigmas:
        noisy = corrupt(images, "gaussian_noise", sigma, seed=seed)
        for key in TUNED:
            warm = key == "warm"
            lams = [lam0] if key == "early_stopped_cold" else [lam0 * float(f) for f in factors]
            lam, k, sel = select_lambda(model, select, sigma, lams, warm, grid, seed=seed,
                                        batch_size=batch_size, device=device)
            bar.update(len(lams))
            selection += [dict(r, method=key) for r in sel]
            c = run_curves(at_lambda(model, lam), noisy, grid, warm, target=images, batch_size=batch_size,
                           device=device, show_progress=False)
            at = c.ks.index(k)
            rows.append({"sigma": sigma, "key": key, "method": TUNED[key], "lam": lam, "k": k,
                         "psnr": float(c.psnr[at].mean()), "ssim": float(c.ssim[at].mean()),
                         **{f"psnr@{b}": float(c.psnr[c.ks.index(b)].mean()) for b in budgets}})
    bar.close()
    return rows, selection


def _tuned_markdown(rows: Sequence[dict[str, Any]], budgets: Sequence[int]) -> list[str]:
    if not rows:
        return []
    lines = ["", "### Denoising as a user would run it", "",
             "Per σ and method, λ (a multiple of the trained λ) and the stopping iteration k are chosen on "
             "noisy val images (other noise draws), then measured on the test images; WARP-LCA uses its "
             "predictor as trained (at the clean λ). PSNR/SSIM against the clean images.", "",
             markdown_table(rows, ["sigma", "method", "lam", "k", "psnr", "ssim",
                                   *(f"psnr@{b}" for b in budgets)],
                            ["σ", "method", "λ", "k (chosen on val)", "PSNR at k (dB)", "SSIM at k",
                             *(f"PSNR @ {b}" for b in budgets)]), ""]
    for sigma in sorted({r["sigma"] for r in rows}):
        by = {r["key"]: r for r in rows if r["sigma"] == sigma}
        warm, base = by["warm"]["psnr"], max(by["early_stopped_cold"]["psnr"], by["cold"]["psnr"])
        verdict = "≥" if warm >= base else "<"
        lines.append(f"- σ = {sigma:g}: WARP-LCA {fmt(warm, 4)} dB {verdict} the best cold LCA "
                     f"{fmt(base, 4)} dB ({'holds' if warm >= base else 'does not hold'}).")
    return lines


@dataclass(frozen=True)
class DenoiseSettings(Checked):
    """``eval.denoise``: Gaussian noise levels σ, the budgets tabulated and the example images."""

    sigmas: Annotated[Sequence[float], Gt(0), Le(1), NonEmpty(), Doc("σ on the [0, 1] pixel scale")] = (
        0.05, 0.1, 0.2)
    budgets: Annotated[Sequence[int], Ge(1), NonEmpty()] = (1, 10, 100, 1000)
    examples: Annotated[int, Ge(0)] = 4
    lam_factors: Annotated[Sequence[float], Gt(0), Doc("λ candidates (× the trained λ) chosen on val per σ "
                                                          "and method ([]: no selection)")] = (
        1.0, 1.5, 2.0, 3.0, 4.0)
    select_split: Annotated[str, Doc("images λ and k are chosen on (never the measured split)")] = "val"
    select_images: Annotated[int, Ge(1)] = 32


@evaluation("denoise", DenoiseSettings)
def denoise_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=denoise``: experiment 3 on the run's model and images (settings: ``eval.denoise``)."""
    conf = session.settings["denoise"]
    select = None
    if conf["lam_factors"]:
        if conf["select_split"] == session.settings["split"]:
            raise ValueError(f"eval.denoise.select_split={conf['select_split']} is the measured split: λ and "
                             "k would be tuned on the images they are reported on")
        select = session.split_images(str(conf["select_split"]), int(conf["select_images"]))
    return measure_denoise(session.model, session.images, sigmas=conf["sigmas"], budgets=conf["budgets"],
                           seed=int(session.cfg.get("seed") or 0), examples=int(conf["examples"]),
                           select_images=select, lam_factors=conf["lam_factors"], **session.run_kwargs())
