"""Experiment 2 — other thresholds (README, "Experiments and reports").

The convergence comparison for soft, cel0 and half thresholds, each with its own WARP-CNN
(``python train.py experiment=thresholds_<name>``), next to the main run's bundle. Energies of different
penalties are not comparable, so curves are relative to each threshold's cold energy at T.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    Figure,
    clip_ks,
    describe_model,
    find_bundle,
    load_model,
)
from warplca.evaluation.convergence import match_sentence
from warplca.evaluation.curves import Curves, curve_rows, measure, row_metrics
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.plots import plot_sets
from warplca.evaluation.report import markdown_table
from warplca.settings import Annotated, Checked, Doc, Ge

__all__ = ["load_threshold_models", "measure_thresholds", "thresholds_evaluation"]

COLUMNS = ["threshold", "lam", "method", "k", "energy", "rel_energy", "psnr", "ssim", "l0", "l0_frac"]
#: one row per threshold (``<prefix>_summary.csv``)
SUMMARY_COLUMNS = [
    "threshold", "lam", "iterations_to_match", "iterations_to_match_median", "matched_frac", "speedup",
    "energy_ratio", "cold_psnr", "warm_psnr", "cold_l0_frac", "warm_l0_frac",
]


def load_threshold_models(runs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike | None],
                          device: torch.device | str = "cpu") -> tuple[dict[str, EvalModel], list[str]]:
    """Load bundles from run dirs / ``.pt`` files, labelled by the mapping keys or each bundle's threshold;
    missing runs are skipped with a note."""
    items = list(runs.items()) if isinstance(runs, Mapping) else [(None, r) for r in runs]
    models: dict[str, EvalModel] = {}
    notes: list[str] = []
    for label, path in items:
        if path is None or str(path) == "":
            notes.append(f"`{label}`: no run given (train one with `python train.py "
                         f"experiment=thresholds_{label}` and pass `eval.thresholds.runs.{label}=<run dir>`)")
            continue
        try:
            bundle = find_bundle(path)
        except FileNotFoundError as exc:  # no bundle there
            notes.append(f"`{label or path}`: skipped: {exc}")
            continue
        model = load_model(bundle, device)
        name = str(label) if label is not None else describe_model(model)["threshold"]
        if name in models:
            name = f"{name}:{Path(path).name}"
        models[name] = model
    return models, notes


def measure_thresholds(models: Mapping[str, EvalModel], images: Tensor, *, iters: int = 1000,
                       budgets: Sequence[int] = (1, 10, 100, 1000), batch_size: int = 64,
                       notes: Sequence[str] = (), prefix: str = "thresholds", show_progress: bool = True,
                       device: torch.device | None = None) -> ExperimentResult:
    """Cold vs warm for every threshold's bundle on the same [0, 1] ``images``; summary table + plot.

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets), ``<prefix>_summary.csv``
    (one row per threshold), ``<prefix>.png``. Metrics: ``<prefix>/<threshold>/<cold|warm>/<metric>@<k>``,
    ``<prefix>/<threshold>/iterations_to_match``, ``<prefix>/<threshold>/energy_ratio@T``.
    """
    total = int(iters)
    budgets = clip_ks(budgets, total)[1:]  # the budgets ≥ 1, T included
    curves: dict[str, dict[str, Curves]] = {}
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    sentences: list[str] = []
    metrics: dict[str, float] = {}
    for name, model in models.items():
        lam = describe_model(model)["lam"]
        cond, match = measure(model, images, total, budgets, name=name, batch_size=batch_size, device=device,
                              show_progress=show_progress)
        curves[name] = cond
        ref = float(cond["cold"].energy[total].mean())
        rows += [dict(r, rel_energy=r["energy"] / ref if ref else math.nan)
                 for r in curve_rows(cond, {"threshold": name, "lam": lam})]
        cold_t, warm_t = cond["cold"].at(total), cond["warm"].at(total)
        entry = {
            "threshold": name, "lam": lam, **{k: match[k] for k in SUMMARY_COLUMNS[2:6]},
            "energy_ratio": warm_t["energy"] / ref if ref else math.nan,
            "cold_psnr": cold_t["psnr"], "warm_psnr": warm_t["psnr"],
            "cold_l0_frac": cold_t["l0_frac"], "warm_l0_frac": warm_t["l0_frac"],
        }
        summary.append(entry)
        sentences.append(f"- **{name}**: {match_sentence(match)}")
        for key in ("iterations_to_match", "matched_frac", "speedup"):
            metrics[f"{prefix}/{name}/{key}"] = entry[key]
        metrics[f"{prefix}/{name}/energy_ratio@T"] = entry["energy_ratio"]
    table = [r for r in rows if r["k"] in budgets]
    metrics.update(row_metrics(prefix, table, ("energy", "rel_energy", "psnr", "ssim", "l0_frac"),
                               group="threshold"))

    title = f"Thresholds — {images.shape[0]} images {images.shape[-2]}×{images.shape[-1]}, T={total}"
    md = ["## Thresholds", "", f"{title}. Each threshold has its own WARP-CNN (trained with "
          "`experiment=thresholds_<name>`); energies are relative to that threshold's cold LCA at T.", ""]
    figures: dict[str, Figure] = {}
    if curves:
        figures["plot"] = Figure(f"{prefix}.png", "thresholds", lambda: plot_sets(
            curves, ["rel_energy", "psnr", "l0_frac"], title, (15, 4.6)))
        shown = [dict(r, method=METHODS.get(r["method"], r["method"])) for r in table]
        md += [
            markdown_table(summary, SUMMARY_COLUMNS, [
                "threshold", "λ", "iterations-to-match", "median (per image)", "matched", "speedup",
                f"E_warm/E_cold @ {total}", f"PSNR cold @ {total}", f"PSNR warm @ {total}", "ℓ0 cold",
                "ℓ0 warm"]),
            markdown_table(
                shown, ["threshold", "method", "k", "rel_energy", "psnr", "ssim", "l0_frac"],
                ["threshold", "method", "iterations", "E / E_cold(T)", "PSNR (dB)", "SSIM", "ℓ0 fraction"]),
            *sentences, "", figures["plot"].link,
        ]
    else:
        md.append("No threshold bundle was available.")
    return ExperimentResult.from_lines(
        prefix, md, notes, metrics=metrics, figures=figures,
        csv={f"{prefix}.csv": (COLUMNS, rows), f"{prefix}_table.csv": (COLUMNS, table),
             f"{prefix}_summary.csv": (SUMMARY_COLUMNS, summary)},
        tables={f"{prefix}/curves": (COLUMNS, rows), f"{prefix}/summary": (SUMMARY_COLUMNS, summary)})


@dataclass(frozen=True)
class ThresholdsSettings(Checked):
    """``eval.thresholds``: the runs whose bundles are compared (name -> run directory), whether the
    evaluated run joins them, and T (null: the run's)."""

    runs: Annotated[Mapping[str, str], Doc("name -> run directory of a thresholds_* experiment")] = field(
        default_factory=lambda: {name: f"outputs/thresholds_{name}" for name in ("soft", "cel0", "half")})
    include_main: bool = True
    iters: Annotated[int | None, Ge(1)] = None


@evaluation("thresholds", ThresholdsSettings)
def thresholds_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=thresholds``: experiment 2 on the bundles of ``eval.thresholds.runs`` (and the run's own)."""
    conf = session.settings["thresholds"]
    models, notes = load_threshold_models(conf["runs"] or {}, session.device)
    if conf["include_main"]:
        label = f"{describe_model(session.model)['threshold']} (this run)"
        models = {label: session.model, **models}
    if not models:
        raise FileNotFoundError("eval=thresholds: no bundle found. " + " ".join(notes))
    return measure_thresholds(models, session.images, iters=session.total(conf.get("iters")),
                              budgets=session.settings["budgets"], notes=notes, **session.run_kwargs())
