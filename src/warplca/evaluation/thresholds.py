"""Experiment 2 — other thresholds (README, "Experiments and reports").

The convergence comparison for soft (ℓ1), cel0 (firm) and half (ℓ1/2) thresholds, each with its own
WARP-CNN trained on states of that threshold (``python train.py experiment=thresholds_<name>``), next
to the main run's hard-threshold bundle. Energies of different penalties are not comparable in
absolute terms, so curves are shown relative to each threshold's own cold energy at T
(E_k / E_cold(T): 1 is where cold LCA ends; below 1 is a better minimum).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    describe_model,
    find_bundle,
    load_model,
    style_iteration_axes,
)
from warplca.evaluation.convergence import Curves, match_sentence, measure
from warplca.evaluation.report import markdown_table, write_csv

log = logging.getLogger(__name__)

__all__ = ["evaluate_thresholds", "load_threshold_models", "plot_thresholds"]

COLUMNS = ["threshold", "lam", "method", "k", "energy", "rel_energy", "psnr", "ssim", "l0", "l0_frac"]


def load_threshold_models(
    runs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike | None],
    device: torch.device | str = "cpu",
) -> tuple[dict[str, EvalModel], list[str]]:
    """Load bundles from run dirs / ``.pt`` files; labels are the mapping keys or each bundle's threshold.

    Missing runs are skipped with a note (they are trained separately, see the module doc).
    """
    items = list(runs.items()) if isinstance(runs, Mapping) else [(None, r) for r in runs]
    models: dict[str, EvalModel] = {}
    notes: list[str] = []
    for label, path in items:
        if path is None or str(path) == "":
            notes.append(
                f"`{label}`: no run given (train one with `python train.py experiment=thresholds_{label}` "
                f"and pass `eval.thresholds.runs.{label}=<run dir>`)"
            )
            continue
        try:
            find_bundle(path)
        except FileNotFoundError as exc:
            notes.append(f"`{label or path}`: skipped: {exc}")
            continue
        model = load_model(path, device)
        name = str(label) if label is not None else describe_model(model)["threshold"]
        if name in models:
            name = f"{name}:{Path(path).name}"
        models[name] = model
    return models, notes


def plot_thresholds(curves: Mapping[str, Mapping[str, Curves]], title: str = "") -> Any:
    """Relative energy, PSNR and ℓ0 fraction against iterations; one colour per threshold, dashed = cold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, (name, cond) in enumerate(curves.items()):
        ref = float(cond["cold"].energy[-1].mean())
        for method, c in cond.items():
            style = "--" if method == "cold" else "-"
            label = f"{name} — {METHODS.get(method, method)}"
            it = torch.arange(1, c.total + 1).numpy()
            axes[0].plot(it, (c.energy[1:].mean(1) / ref).numpy(), style, color=cmap(i % 10), label=label)
            ks = [k for k in c.ks if k >= 1]
            axes[1].plot(
                ks,
                c.psnr[[c.ks.index(k) for k in ks]].mean(1).numpy(),
                style,
                marker="o",
                ms=3,
                color=cmap(i % 10),
                label=label,
            )
            axes[2].plot(
                it, (c.l0[1:] / c.code_numel).mean(1).numpy(), style, color=cmap(i % 10), label=label
            )
    axes[0].axhline(1.0, color="gray", ls=":", lw=1)
    style_iteration_axes((
        (axes[0], "E_k / E_cold(T)", "Energy relative to cold LCA at T"),
        (axes[1], "PSNR (dB)", "PSNR vs clean image"),
        (axes[2], "ℓ0 fraction", "Active fraction of the code"),
    ))
    fig.suptitle(title or "Thresholds: cold LCA (dashed) vs WARP-LCA (solid)")
    fig.tight_layout()
    return fig


def evaluate_thresholds(
    models: Mapping[str, EvalModel],
    images: Tensor,
    out_dir: str | Path,
    *,
    iters: int = 1000,
    budgets: Sequence[int] = (1, 10, 100, 1000),
    batch_size: int = 64,
    notes: Sequence[str] = (),
    prefix: str = "thresholds",
    show_progress: bool = True,
    device: torch.device | None = None,
) -> ExperimentResult:
    """Cold vs warm for every threshold's bundle on the same [0, 1] ``images``; summary table + plot.

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets), ``<prefix>_summary.csv``
    (one row per threshold), ``<prefix>.png``. Metrics: ``<prefix>/<threshold>/<cold|warm>/<metric>@<k>``,
    ``<prefix>/<threshold>/iterations_to_match``, ``<prefix>/<threshold>/energy_ratio@T``.
    """
    from warplca.plotting import save_png

    out_dir = Path(out_dir)
    total = int(iters)
    budgets = sorted({int(b) for b in budgets if 1 <= int(b) <= total} | {total})
    curves: dict[str, dict[str, Curves]] = {}
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for name, model in models.items():
        info = describe_model(model)
        cond, match = measure(
            model,
            images,
            total,
            budgets,
            batch_size=batch_size,
            device=device,
            show_progress=show_progress,
            name=name,
        )
        curves[name] = cond
        ref = float(cond["cold"].energy[total].mean())
        for method, c in cond.items():
            for k in c.ks:
                at = c.at(k)
                row = {
                    "threshold": name,
                    "lam": info["lam"],
                    "method": method,
                    "k": k,
                    **at,
                    "rel_energy": at["energy"] / ref if ref else math.nan,
                }
                rows.append(row)
                if k in budgets:
                    table.append(row)
                    for key in ("energy", "rel_energy", "psnr", "ssim", "l0_frac"):
                        metrics[f"{prefix}/{name}/{method}/{key}@{k}"] = row[key]
        cold_t, warm_t = cond["cold"].at(total), cond["warm"].at(total)
        entry = {
            "threshold": name,
            "lam": info["lam"],
            "iterations_to_match": match["mean"],
            "iterations_to_match_median": match["median"],
            "matched_frac": match["matched_frac"],
            "speedup": match["speedup"],
            "energy_ratio": warm_t["energy"] / ref if ref else math.nan,
            "cold_psnr": cold_t["psnr"],
            "warm_psnr": warm_t["psnr"],
            "cold_l0_frac": cold_t["l0_frac"],
            "warm_l0_frac": warm_t["l0_frac"],
        }
        summary.append(entry)
        for key in ("iterations_to_match", "matched_frac", "speedup"):
            metrics[f"{prefix}/{name}/{key}"] = entry[key]
        metrics[f"{prefix}/{name}/energy_ratio@T"] = entry["energy_ratio"]

    files: dict[str, Path] = {}
    title = f"Thresholds — {images.shape[0]} images {images.shape[-2]}×{images.shape[-1]}, T={total}"
    summary_cols = [
        "threshold",
        "lam",
        "iterations_to_match",
        "iterations_to_match_median",
        "matched_frac",
        "speedup",
        "energy_ratio",
        "cold_psnr",
        "warm_psnr",
        "cold_l0_frac",
        "warm_l0_frac",
    ]
    files["csv"] = write_csv(out_dir / f"{prefix}.csv", rows, COLUMNS)
    files["table"] = write_csv(out_dir / f"{prefix}_table.csv", table, COLUMNS)
    files["summary"] = write_csv(out_dir / f"{prefix}_summary.csv", summary, summary_cols)
    md = [
        "## Thresholds",
        "",
        f"{title}. Each threshold has its own WARP-CNN (trained with `experiment=thresholds_<name>`); "
        "energies are relative to that threshold's cold LCA at T.",
        "",
    ]
    if curves:
        files["plot"] = save_png(plot_thresholds(curves, title), out_dir / f"{prefix}.png")
        md.append(
            markdown_table(
                summary,
                summary_cols,
                [
                    "threshold",
                    "λ",
                    "iterations-to-match",
                    "median (per image)",
                    "matched",
                    "speedup",
                    f"E_warm/E_cold @ {total}",
                    f"PSNR cold @ {total}",
                    f"PSNR warm @ {total}",
                    "ℓ0 cold",
                    "ℓ0 warm",
                ],
            )
        )
        shown = [dict(r, method=METHODS.get(r["method"], r["method"])) for r in table]
        md.append(
            markdown_table(
                shown,
                ["threshold", "method", "k", "rel_energy", "psnr", "ssim", "l0_frac"],
                ["threshold", "method", "iterations", "E / E_cold(T)", "PSNR (dB)", "SSIM", "ℓ0 fraction"],
            )
        )
        md += [
            f"- **{s['threshold']}**: {match_sentence({**_match(s), 'reference': total})}" for s in summary
        ]
        md += ["", f"![thresholds]({files['plot'].name})"]
    else:
        md.append("No threshold bundle was available.")
    if notes:
        md += ["", "Notes:", *[f"- {n}" for n in notes]]
    tables = {f"{prefix}/curves": (COLUMNS, rows), f"{prefix}/summary": (summary_cols, summary)}
    return ExperimentResult(
        name=prefix,
        metrics=metrics,
        markdown="\n".join(md) + "\n",
        files=files,
        tables=tables,
        notes=list(notes),
    )


def _match(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "mean": entry["iterations_to_match"],
        "median": entry["iterations_to_match_median"],
        "matched_frac": entry["matched_frac"],
        "speedup": entry["speedup"],
    }
