"""Scoring WARP-CNN variants: the ablation and the learning curve of the warm start (README, "Results").

Every variant is scored against one cold-LCA run on the same held-out images: energy at the budgets,
iterations-to-match, the energy ratio warm / cold at T and ℓ0 at T. Training lives in the tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from warplca.evaluation.common import EvalModel, clip_ks
from warplca.evaluation.curves import Curves, iterations_to_match, run_curves
from warplca.evaluation.plots import finish_figure
from warplca.evaluation.report import fmt, markdown_table

__all__ = ["best_variant", "cold_reference", "cold_row", "format_scores", "plot_learning_curve",
           "plot_variant_scores", "score_columns", "score_curves", "score_warm_start", "study_table"]


def cold_reference(model: EvalModel, images: torch.Tensor, total: int, budgets: Sequence[int],
                   batch_size: int = 64, device: torch.device | None = None,
                   show_progress: bool = True) -> Curves:
    """Cold-LCA curves on ``images`` up to ``total`` iterations (shared by every variant)."""
    return run_curves(model, images, clip_ks(budgets, total), warm=False, batch_size=batch_size,
                      device=device, show_progress=show_progress, desc=f"cold LCA ×{total}")


def score_warm_start(model: EvalModel, images: torch.Tensor, cold: Curves, budgets: Sequence[int],
                     batch_size: int = 64, device: torch.device | None = None, show_progress: bool = True,
                     desc: str = "") -> dict[str, float]:
    """One variant's scores against ``cold`` (same images, T = ``cold.total``): ``iterations_to_match``
    (NaN: never), ``matched_frac``, ``energy@k`` for k ∈ budgets ∪ {0, T}, ``energy_ratio@T``, ``l0@T``."""
    total = cold.total
    warm = run_curves(model, images, clip_ks(budgets, total), warm=True, batch_size=batch_size, device=device,
                      show_progress=show_progress, desc=desc or f"WARP-LCA ×{total}")
    return score_curves(warm, cold, budgets)


def score_curves(warm: Curves, cold: Curves, budgets: Sequence[int]) -> dict[str, float]:
    """:func:`score_warm_start`'s scores of measured ``warm`` curves against ``cold`` (same images)."""
    match = iterations_to_match(cold, warm, cold.total)
    return _row(warm, cold, budgets, float(match["iterations_to_match"]), float(match["matched_frac"]))


def cold_row(cold: Curves, budgets: Sequence[int]) -> dict[str, float]:
    """The cold-LCA reference in the same columns as :func:`score_warm_start` (it "matches" at T)."""
    return _row(cold, cold, budgets, float(cold.total), 1.0)


def _row(curves: Curves, cold: Curves, budgets: Sequence[int], iterations_to_match: float,
         matched_frac: float) -> dict[str, float]:
    """The score columns of ``curves`` against ``cold`` (see :func:`score_warm_start`)."""
    total = cold.total
    return {"iterations_to_match": iterations_to_match, "matched_frac": matched_frac,
            **{f"energy@{k}": float(curves.energy[k].mean()) for k in clip_ks(budgets, total)},
            "energy_ratio@T": float(curves.energy[total].mean() / cold.energy[total].mean()),
            "l0@T": float(curves.l0[total].mean())}


def best_variant(rows: Sequence[Mapping[str, Any]], total: int) -> Mapping[str, Any]:
    """The row with the fewest iterations-to-match; rows that never match rank after, by final energy."""
    def rank(row: Mapping[str, Any]) -> tuple[bool, float, float]:
        k = float(row["iterations_to_match"])
        return (math.isnan(k), 0.0 if math.isnan(k) else k, float(row[f"energy@{total}"]))

    return min(rows, key=rank)


def score_columns(total: int, budgets: Sequence[int]) -> list[str]:
    """Score columns in table order."""
    return ["iterations_to_match", "matched_frac", *(f"energy@{k}" for k in clip_ks(budgets, total)),
            "energy_ratio@T", "l0@T"]


def study_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], total: int,
                budgets: Sequence[int]) -> str:
    """Markdown table: the variant keys, then the scores (iterations-to-match shown as "never" if NaN)."""
    def shown(k: Any) -> Any:
        if not isinstance(k, float):
            return k
        return f"never (> {total})" if math.isnan(k) else int(k)

    extra = [c for c in ("train_s", "params") if any(c in r for r in rows)]
    return markdown_table([dict(r, iterations_to_match=shown(r.get("iterations_to_match"))) for r in rows],
                          [*keys, *score_columns(total, budgets), *extra])


def _finish(fig: Any, axes: Sequence[Any], cold: Mapping[str, Any], total: int, title: str, path: str | Path,
            early: int | None = None) -> Path:
    """Cold LCA in both panels (T on the iterations-to-match axis; its energy at T, and at ``early`` if
    given), legends, title; writes the PNG."""
    from warplca.plotting import save_png

    axes[0].axhline(total, color="tab:blue", ls="--", lw=1, label=f"cold LCA: T = {total}")
    axes[0].set_ylabel("iterations to match cold@T\n(never: drawn at T)")
    axes[1].axhline(cold[f"energy@{total}"], color="tab:blue", ls="--", lw=1, label=f"cold @{total}")
    if early is not None:
        axes[1].axhline(cold[f"energy@{early}"], color="tab:gray", ls=":", lw=1, label=f"cold @{early}")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_png(finish_figure(fig, title), path)


def _match_value(row: Mapping[str, Any], total: int) -> float:
    """Iterations-to-match for plotting: "never" drawn at T (the top of the axis)."""
    k = float(row["iterations_to_match"])
    return float(total) if math.isnan(k) else max(k, 1.0)


def plot_variant_scores(rows: Sequence[Mapping[str, Any]], cold: Mapping[str, Any], total: int, early: int,
                        path: str | Path, title: str = "WARP-CNN variants") -> Path:
    """Two bar panels, a bar per variant (the ablation's, the levers'): iterations-to-match and energy after
    ``early`` / T iterations, cold LCA as reference lines; ``title`` heads the figure."""
    import matplotlib.pyplot as plt

    labels = [str(r["variant"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(rows) + 4), 3.8))
    pos = list(range(len(rows)))
    ax1.bar(pos, [_match_value(r, total) for r in rows], color="tab:orange")
    for shift, k, color in ((-0.2, early, "tab:orange"), (0.2, total, "tab:red")):
        ax2.bar([p + shift for p in pos], [r[f"energy@{k}"] for r in rows], 0.4, label=f"warm @{k}",
                color=color)
    ax1.set_ylim(0, 1.08 * total)
    ax2.set_ylabel("mean energy")
    for ax in (ax1, ax2):
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, (ax1, ax2), cold, total, title, path)


def plot_learning_curve(rows: Sequence[Mapping[str, Any]], cold: Mapping[str, Any], total: int, early: int,
                        path: str | Path) -> Path:
    """Training-set size (log₂ axis) against iterations-to-match and energy@``early``, a line per epochs."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for epochs in sorted({int(r["epochs"]) for r in rows}):
        sub = sorted((r for r in rows if int(r["epochs"]) == epochs), key=lambda r: int(r["train_size"]))
        sizes = [int(r["train_size"]) for r in sub]
        ax1.plot(sizes, [_match_value(r, total) for r in sub], "o-", label=f"{epochs} epochs")
        ax2.plot(sizes, [r[f"energy@{early}"] for r in sub], "o-", label=f"{epochs} epochs")
    ax1.set_yscale("log")
    ax2.set_ylabel(f"mean energy after {early} iterations")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training images (cached targets)")
        ax.grid(True, alpha=0.3)
    return _finish(fig, (ax1, ax2), cold, total, "WARP-CNN learning curve", path, early)


def format_scores(row: Mapping[str, Any], total: int, early: int) -> str:
    """One log line: iterations-to-match and energies."""
    k = float(row["iterations_to_match"])
    match = "never" if math.isnan(k) else str(int(k))
    return (f"match {match}, energy@{early} {fmt(row[f'energy@{early}'])}, energy@{total} "
            f"{fmt(row[f'energy@{total}'])} (ratio {fmt(row['energy_ratio@T'], 5)})")
