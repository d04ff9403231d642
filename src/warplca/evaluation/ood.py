"""Experiment 4 — out of distribution (DESIGN §6.4; PAPER claim 7).

A bundle trained on one dataset is applied, unchanged (its own normalisation, dictionary and
predictor), to other datasets and to larger images — WARP-CNN is fully convolutional, so 64×64 or
96×96 inputs just give larger state maps. Each source is a datamodule config plus a split; a source
whose files are missing (STL-10, Pets without ``paths.data_dir`` contents) is skipped with a note.
Channel mismatches are bridged when that is lossless in meaning: 1-channel images are replicated to
3 channels, 3-channel images are converted to luminance for a 1-channel model.

Energies are compared per pixel value (``energy_norm`` = E / (C·H·W)) since image sizes differ.
"""

from __future__ import annotations

import logging
import math
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
    build_datamodule_from_config,
    describe_model,
    load_images,
    style_iteration_axes,
)
from warplca.evaluation.convergence import Curves, match_sentence, measure
from warplca.evaluation.report import fmt, markdown_table, write_csv

log = logging.getLogger(__name__)

__all__ = ["OODSource", "evaluate_ood", "load_source", "plot_ood"]

COLUMNS = ["dataset", "size", "method", "k", "energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac"]


@dataclass
class OODSource:
    """One evaluation dataset: a name, a datamodule config (``name``/``_target_`` + kwargs), a split
    and how many images to take (None: the experiment's default)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    split: str = "test"
    n_images: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> OODSource:
        from warplca.evaluation.common import _plain

        d = _plain(cfg)
        if "name" not in d:
            raise ValueError(f"an OOD source needs a name, got {d}")
        return cls(
            name=str(d["name"]),
            data=dict(d.get("data") or {}),
            split=str(d.get("split", "test")),
            n_images=d.get("n_images"),
        )


def match_channels(images: Tensor, channels: int) -> tuple[Tensor, str | None]:
    """Replicate grey images to 3 channels or take the luminance of colour images; note what was done."""
    have = images.shape[1]
    if have == channels:
        return images, None
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous(), "grey images replicated to 3 channels"
    if have == 3 and channels == 1:
        from warplca.data import luminance

        return luminance(images), "colour images converted to luminance"
    raise ValueError(f"cannot feed {have}-channel images to a {channels}-channel model")


def load_source(source: OODSource, channels: int, default_n: int) -> tuple[Tensor | None, str | None]:
    """Images of a source (matched to ``channels``) and a note; (None, reason) when it is unavailable."""
    from warplca.data import DatasetNotFoundError

    try:
        dm = build_datamodule_from_config(source.data)
        images = load_images(dm, source.split, source.n_images or default_n)
    except (DatasetNotFoundError, FileNotFoundError) as exc:
        return None, f"skipped: {exc}"
    except ValueError as exc:  # e.g. a crop larger than the photos
        return None, f"skipped: {exc}"
    try:
        images, note = match_channels(images, channels)
    except ValueError as exc:
        return None, f"skipped: {exc}"
    return images, note


def plot_ood(curves: Mapping[str, Mapping[str, Curves]], title: str = "") -> Any:
    """Energy per pixel value and PSNR against iterations; one colour per dataset, dashed = cold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, (name, cond) in enumerate(curves.items()):
        for method, c in cond.items():
            style = "--" if method == "cold" else "-"
            label = f"{name} — {METHODS.get(method, method)}"
            it = torch.arange(1, c.total + 1).numpy()
            axes[0].plot(it, (c.energy[1:] / c.numel).mean(1).numpy(), style, color=cmap(i % 10), label=label)
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
    style_iteration_axes((
        (axes[0], "energy / (C·H·W)", "Energy per pixel value"),
        (axes[1], "PSNR (dB)", "PSNR vs clean image"),
    ))
    fig.suptitle(title or "Out of distribution: cold LCA (dashed) vs WARP-LCA (solid)")
    fig.tight_layout()
    return fig


def evaluate_ood(
    model: EvalModel,
    sources: Sequence[OODSource],
    out_dir: str | Path,
    *,
    iters: int = 1000,
    budgets: Sequence[int] = (1, 10, 100, 1000),
    n_images: int = 64,
    batch_size: int = 64,
    reference: tuple[str, Tensor] | None = None,
    prefix: str = "ood",
    show_progress: bool = True,
    device: torch.device | None = None,
) -> ExperimentResult:
    """Cold LCA vs WARP-LCA on each source (and the in-distribution ``reference`` images, if given).

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets), ``<prefix>.png``.
    Metrics: ``<prefix>/<dataset>/<cold|warm>/<metric>@<k>`` and ``<prefix>/<dataset>/iters_to_match``.
    """
    from warplca.plotting import save_png

    out_dir = Path(out_dir)
    total = int(iters)
    budgets = sorted({int(b) for b in budgets if 1 <= int(b) <= total} | {total})
    channels = model.dictionary.in_channels
    notes: list[str] = []
    datasets: list[tuple[str, Tensor, str | None]] = []
    if reference is not None:
        datasets.append(
            (reference[0], reference[1][:n_images], "in distribution (the training data's test split)")
        )
    for source in sources:
        images, note = load_source(source, channels, n_images)
        if images is None:
            notes.append(f"`{source.name}`: {note}")
            log.warning("OOD source %s %s", source.name, note)
            continue
        datasets.append((source.name, images, note))

    curves: dict[str, dict[str, Curves]] = {}
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    matches: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    for name, images, note in datasets:
        size = f"{images.shape[-2]}×{images.shape[-1]}"
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
        curves[name], matches[name] = cond, match
        for method, c in cond.items():
            for k in c.ks:
                row = {"dataset": name, "size": size, "method": method, "k": k, **c.at(k)}
                rows.append(row)
                if k in budgets:
                    table.append(row)
                    for key in ("energy_norm", "psnr", "ssim", "l0_frac"):
                        metrics[f"{prefix}/{name}/{method}/{key}@{k}"] = row[key]
        metrics[f"{prefix}/{name}/iters_to_match"] = match["mean"]
        metrics[f"{prefix}/{name}/matched_frac"] = match["matched_frac"]
        metrics[f"{prefix}/{name}/n_images"] = float(images.shape[0])
        if note:
            notes.append(f"`{name}` ({size}, {images.shape[0]} images): {note}")

    files: dict[str, Path] = {}
    info = describe_model(model)
    title = f"Out of distribution — {info['threshold']} threshold, λ={fmt(info['lam'])}, T={total}"
    files["csv"] = write_csv(out_dir / f"{prefix}.csv", rows, COLUMNS)
    files["table"] = write_csv(out_dir / f"{prefix}_table.csv", table, COLUMNS)
    md = [
        "## Out of distribution",
        "",
        f"{title}. The bundle is applied unchanged (its own normalisation); energy per pixel value "
        f"(E / C·H·W) makes image sizes comparable.",
        "",
    ]
    if curves:
        files["plot"] = save_png(plot_ood(curves, title), out_dir / f"{prefix}.png")
        shown = [dict(r, method=METHODS.get(r["method"], r["method"])) for r in table]
        md.append(
            markdown_table(
                shown,
                ["dataset", "size", "method", "k", "energy_norm", "psnr", "ssim", "l0_frac"],
                [
                    "dataset",
                    "size",
                    "method",
                    "iterations",
                    "energy / value",
                    "PSNR (dB)",
                    "SSIM",
                    "ℓ0 fraction",
                ],
            )
        )
        md += [f"- **{name}**: {match_sentence(m)}" for name, m in matches.items()]
        md += ["", f"![out-of-distribution curves]({files['plot'].name})"]
    else:
        md.append("No dataset could be evaluated.")
    if notes:
        md += ["", "Notes:", *[f"- {n}" for n in notes]]
    summary = [
        {"dataset": n, "iters_to_match": m["mean"], "matched_frac": m["matched_frac"]}
        for n, m in matches.items()
    ]
    tables = {
        f"{prefix}/curves": (COLUMNS, rows),
        f"{prefix}/iters_to_match": (["dataset", "iters_to_match", "matched_frac"], summary),
    }
    if any(math.isnan(m["mean"]) for m in matches.values()):
        log.info("some OOD datasets never matched the cold energy within T=%d", total)
    return ExperimentResult(
        name=prefix, metrics=metrics, markdown="\n".join(md) + "\n", files=files, tables=tables, notes=notes
    )
