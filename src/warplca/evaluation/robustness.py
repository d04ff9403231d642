"""Noisy-classification robustness: corrupted test sets and the ``robustness.csv`` table, plot and markdown.

Shared by the ``classify`` stage (writes the artifacts) and the report (reads them). Conditions are
``(corruption, level)`` pairs, ``("clean", 0.0)`` first. ``accuracy`` is micro-averaged (correct / images,
in [0, 1]); mCA, the mean corruption accuracy, is its unweighted mean over every corruption × level.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from warplca.data.corruptions import CORRUPTIONS, DEFAULT_LEVELS, corrupt
from warplca.evaluation.common import ExperimentResult, Figure
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.report import write_csv

__all__ = [
    "ACCURACY_NOTE", "CLEAN", "CSV_COLUMNS", "CorruptedDataset", "condition_name", "corrupted_tensor",
    "item_seed", "read_robustness_csv", "robustness_conditions", "robustness_markdown", "robustness_result",
    "robustness_figure", "robustness_summary", "save_robustness_plot", "write_robustness_csv",
    "robustness_evaluation",
]

CLEAN = "clean"
CSV_COLUMNS: tuple[str, ...] = ("frontend", "corruption", "level", "accuracy", "ms_per_image")
#: what every accuracy of these tables is (printed under the markdown summary table)
ACCURACY_NOTE = ("Accuracy: correctly classified test images / test images (micro-averaged, not "
                 "balanced accuracy), in %; mCA: its mean over every corruption × level.")

Condition = tuple[str, float]


def robustness_conditions(levels: Mapping[str, Sequence[float]] | None = None,
                          include_clean: bool = True) -> list[Condition]:
    """``[("clean", 0.0), (corruption, level), …]`` in the order given (default: ``DEFAULT_LEVELS``);
    ValueError for unknown corruptions, no levels, or negative / non-finite levels."""
    levels = DEFAULT_LEVELS if levels is None else levels
    out: list[Condition] = [(CLEAN, 0.0)] if include_clean else []
    for name, values in levels.items():
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
        values = list(values)
        if not values:
            raise ValueError(f"corruption {name!r} has no levels")
        for level in values:
            level = float(level)
            if not math.isfinite(level) or level <= 0:
                raise ValueError(f"corruption {name!r}: levels must be finite and > 0, got {level}")
            out.append((name, level))
    return out


def condition_name(corruption: str, level: float) -> str:
    """Metric-name form of a condition: ``clean`` or ``gaussian_noise@0.2``."""
    return CLEAN if corruption == CLEAN else f"{corruption}@{float(level):g}"


def item_seed(seed: int, index: int) -> int:
    """Seed for item ``index`` of a corrupted set: distinct per index within 32 bits (all torch's CPU
    generator keeps), shifted by the set seed times an odd golden-ratio constant."""
    return (int(index) + int(seed) * 0x9E3779B9) % 2**32


class CorruptedDataset(Dataset):
    """Items ``(corrupt(image_i, corruption, level, item_seed(seed, i)), label_i)`` of a base dataset of
    ``(image (C, H, W) in [0, 1], label)``: the same whatever the batching, workers or DDP sharding."""

    def __init__(self, base: Dataset, corruption: str, level: float, seed: int = 0) -> None:
        if corruption != CLEAN and corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; known: {[CLEAN, *sorted(CORRUPTIONS)]}")
        self.base = base
        self.corruption = corruption
        self.level = float(level)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Any]]:
        """A batch of items at once (the DataLoader's batched fetch; see :func:`corrupted_tensor`)."""
        items = [self.base[int(i)] for i in indices]
        if self.corruption == CLEAN or not items:
            return items
        images = torch.stack([im for im, _ in items])
        out = corrupted_tensor(images, self.corruption, self.level, self.seed, indices)
        return [(out[j], label) for j, (_, label) in enumerate(items)]


#: corruptions that use no random numbers: a batch can be corrupted in one call
DETERMINISTIC = frozenset({"gaussian_blur"})


def corrupted_tensor(images: Tensor, corruption: str, level: float, seed: int = 0,
                     indices: Sequence[int] | None = None) -> Tensor:
    """Corrupt images (N, C, H, W) as items ``indices`` (default ``0..N−1``) of a corrupted set: row j equals
    ``CorruptedDataset(base, corruption, level, seed)[indices[j]][0]``. Blur runs as one batched call,
    random corruptions with one generator per item."""
    if corruption == CLEAN:
        return images.clone()
    if corruption in DETERMINISTIC:
        return corrupt(images, corruption, level, seed)
    indices = range(images.shape[0]) if indices is None else indices
    if len(indices) != images.shape[0]:
        raise ValueError(f"{len(indices)} indices for {images.shape[0]} images")
    return torch.cat([corrupt(images[j : j + 1], corruption, level, item_seed(seed, int(i)))
                      for j, i in enumerate(indices)])


# -- the table ----------------------------------------------------------------------------------
def write_robustness_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows with keys :data:`CSV_COLUMNS` to ``path`` (atomically)."""
    out = []
    for row in rows:
        missing = [c for c in CSV_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"robustness row {dict(row)} lacks columns {missing}")
        out.append({"frontend": row["frontend"], "corruption": row["corruption"],
                    "level": f"{float(row['level']):g}", "accuracy": f"{float(row['accuracy']):.6f}",
                    "ms_per_image": f"{float(row['ms_per_image']):.6g}"})
    return write_csv(path, out, CSV_COLUMNS)


def read_robustness_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``robustness.csv`` with ``level``, ``accuracy``, ``ms_per_image`` as floats."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: expected columns {list(CSV_COLUMNS)}, got {reader.fieldnames}")
        return [{**r, **{k: float(r[k]) for k in CSV_COLUMNS[2:]}} for r in reader]


def _frontends(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["frontend"]) for r in rows))


def _corruptions(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["corruption"]) for r in rows if r["corruption"] != CLEAN))


def robustness_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per front end: ``clean`` accuracy, ``mca``, ``<corruption>`` (mean over its levels) and
    ``ms_per_image`` (mean over conditions)."""
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    out: dict[str, dict[str, float]] = {}
    for fe in _frontends(rows):
        mine = [r for r in rows if r["frontend"] == fe]
        acc = {c: [float(r["accuracy"]) for r in mine if r["corruption"] == c]
               for c in (CLEAN, *_corruptions(mine))}
        out[fe] = {
            "clean": acc[CLEAN][0] if acc[CLEAN] else math.nan,
            "mca": mean([a for c, accs in acc.items() if c != CLEAN for a in accs]),
            "ms_per_image": mean([float(r["ms_per_image"]) for r in mine]),
            **{c: mean(accs) for c, accs in acc.items() if c != CLEAN},
        }
    return out


def robustness_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = "Noisy classification") -> str:
    """Markdown: a summary table (clean, mCA, per-corruption means, ms/image per front end), then one
    accuracy table (%) per corruption (levels × front ends)."""
    rows = list(rows)
    fes, corrs = _frontends(rows), _corruptions(rows)
    line = lambda cells: "| " + " | ".join(cells) + " |"
    head = ["front end", "clean acc. %", "mCA %", *corrs, "ms / image"]
    lines = [*([f"## {title}", ""] if title else []), line(head), "|" + "---|" * len(head)]
    lines += [line([fe, _pct(s["clean"]), _pct(s["mca"]), *(_pct(s.get(c, math.nan)) for c in corrs),
                    f"{s['ms_per_image']:.3g}"]) for fe, s in robustness_summary(rows).items()]
    lines += ["", ACCURACY_NOTE]
    acc = {(str(r["frontend"]), str(r["corruption"]), float(r["level"])): float(r["accuracy"]) for r in rows}
    for corr in corrs:
        levels = sorted({float(r["level"]) for r in rows if r["corruption"] == corr})
        lines += ["", f"**{corr}** (accuracy % = correct / images, level 0 = clean)", "",
                  line(["level", *fes]), "|" + "---|" * (len(fes) + 1)]
        lines += [line([f"{level:g}", *(_pct(acc.get((fe, CLEAN if level == 0.0 else corr, level), math.nan))
                                        for fe in fes)]) for level in [0.0, *levels]]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    """A [0, 1] accuracy as a percentage with one decimal ("–" for NaN)."""
    return "–" if math.isnan(x) else f"{100.0 * x:.1f}"


def robustness_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Accuracy (%) vs level, one panel per corruption, one line per front end (clean at level 0)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = list(rows)
    fes, corrs = _frontends(rows), _corruptions(rows)
    n = max(1, len(corrs))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False, sharey=True)
    for ax, corr in zip(axes[0], corrs or [CLEAN], strict=False):
        for fe in fes:
            clean = [float(r["accuracy"]) for r in rows if r["frontend"] == fe and r["corruption"] == CLEAN]
            pts = sorted((float(r["level"]), float(r["accuracy"]))
                         for r in rows if r["frontend"] == fe and r["corruption"] == corr)
            pts = [(0.0, clean[0])] + pts if clean else pts
            if pts:
                ax.plot([p[0] for p in pts], [100.0 * p[1] for p in pts], marker="o", ms=3, label=fe)
        ax.set(title=corr, xlabel="level")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (% correct)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_robustness_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """:func:`robustness_figure` as a PNG at ``path``."""
    from warplca.plotting import save_png

    return save_png(robustness_figure(rows), path)


def robustness_result(run_dir: str | os.PathLike) -> ExperimentResult:
    """Experiment 5 as a report section from the classify stage's ``robustness.csv``: markdown tables,
    metrics ``robustness/<front end>/<clean|mca|corruption|ms_per_image>`` and ``robustness.png``.
    Nothing is re-classified; without the CSV the section says so."""
    csv_path = Path(run_dir) / "robustness.csv"
    if not csv_path.is_file():
        note = (f"no `{csv_path.name}` in `{run_dir}`: run the classify stage first "
                "(`python train.py run_dir=<run> stages=[classify]`).")
        return ExperimentResult("robustness", markdown=f"## Noisy classification\n\n{note}\n", notes=[note])
    rows = read_robustness_csv(csv_path)
    figure = Figure("robustness.png", "noisy classification", lambda: robustness_figure(rows))
    metrics = {f"robustness/{fe}/{key}": float(value)
               for fe, summary in robustness_summary(rows).items() for key, value in summary.items()}
    return ExperimentResult(
        name="robustness", metrics=metrics, figures={"plot": figure},
        markdown=robustness_markdown(rows).rstrip() + f"\n\n{figure.link}\n",
        tables={"robustness/accuracy": (list(CSV_COLUMNS), [dict(r) for r in rows])})


@evaluation("robustness")
def robustness_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=robustness``: the classify stage's ``robustness.csv`` of the run as a report section."""
    return robustness_result(session.run_dir)
