"""Sweep summaries (docs/scaling.md, "Sweeps"): gather a Hydra multirun directory into one table and plots.

:func:`summarize_sweep` writes ``sweep_summary.csv`` / ``.md``, ``sweep_<param>.png`` per varying
parameter and, for exactly two (e.g. ``hparams_search=warm_map``), ``sweep_map.png`` and pivot tables.
A job with a ``FAILED`` marker or without ``metrics.json`` has status ``failed``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from warplca.evaluation.common import ExperimentResult
from warplca.evaluation.plots import finish_figure
from warplca.evaluation.report import flatten, fmt, markdown_table, read_metrics, write_csv
from warplca.runtime import read_failure
from warplca.serialization import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_METRICS", "SweepJob", "find_jobs", "parse_overrides", "pivot", "read_job",
           "summarize_sweep"]

#: metric-name fragments plotted by default (the first key containing each one, if any)
DEFAULT_METRICS = (
    "convergence/iterations_to_match",
    "convergence/warm/energy@10",
    "convergence/cold/energy@1000",
    "convergence/warm/psnr@10",
    "convergence/energy_ratio@T",
)


@dataclass
class SweepJob:
    """One job of a multirun: its directory, overrides, flattened metrics and status."""

    path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    error: str = ""

    @property
    def name(self) -> str:
        """The job directory's name."""
        return self.path.name


def find_jobs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Job directories under ``sweep_dir`` (those holding ``.hydra/overrides.yaml``), in natural order."""
    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such sweep directory (pass sweep_dir=<the multirun dir>)")
    jobs = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return sorted(jobs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def parse_overrides(lines: Sequence[str]) -> dict[str, Any]:
    """Hydra override strings (``lca.lam=0.5``, ``+x=1``, ``~y``) -> {key: value}; values that YAML reads
    as a scalar (``0.5`` -> 0.5) are typed, others stay strings."""
    out: dict[str, Any] = {}
    for line in lines:
        line = str(line).strip()
        if not line or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key in ("hydra", "sweep_dir"):
            continue
        try:
            typed = yaml.safe_load(value)
        except yaml.YAMLError:
            typed = value
        out[key] = typed if isinstance(typed, (int, float, bool, str)) or typed is None else value
    return out


def read_job(path: str | os.PathLike) -> SweepJob:
    """Read one job directory (overrides + metrics); no or unreadable ``metrics.json`` -> ``failed``."""
    path = Path(path)
    job = SweepJob(path=path)
    try:
        job.overrides = parse_overrides(
            yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, yaml.YAMLError) as exc:
        job.error = f"unreadable overrides: {exc}"
    try:
        raw = read_metrics(path / "metrics.json")
    except ValueError as exc:
        raw = {}
        job.error = str(exc)
    job.metrics = {k: float(v) if _is_number(v) else math.nan
                   for k, v in flatten(raw).items() if _is_number(v) or v is None}
    failure = read_failure(path)  # the FAILED marker the task wrapper writes when a sweep job fails
    if failure is not None or not job.metrics:
        job.status = "failed"
        job.error = failure or job.error or "no metrics.json (the job failed or did not finish)"
    return job


def _pick_metrics(jobs: Sequence[SweepJob], wanted: Sequence[str] | None) -> list[str]:
    """The metrics to plot: each of ``wanted`` (itself, else the first key containing it), else the first key
    containing each of :data:`DEFAULT_METRICS`, else the first four keys."""
    keys = sorted({k for j in jobs for k in j.metrics})
    first = lambda frag: next((k for k in keys if frag in k), None)  # noqa: E731
    picked = []
    for w in wanted or ():
        hit = w if w in keys else first(w)
        if hit is None:
            log.warning("sweep: no metric matches %r", w)
        else:
            picked.append(hit)
    if not picked:
        picked = [hit for frag in DEFAULT_METRICS if (hit := first(frag)) is not None]
    return list(dict.fromkeys(picked)) or keys[:4]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_parameter(jobs: Sequence[SweepJob], param: str, others: Sequence[str],
                   metrics: Sequence[str]) -> Any:
    """Each metric against ``param``; one line per combination of the ``others`` swept parameters."""
    import matplotlib.pyplot as plt

    ok = [j for j in jobs if j.status == "ok" and param in j.overrides]
    values = [j.overrides[param] for j in ok]
    numeric = all(_is_number(v) for v in values) and bool(values)
    cats = sorted({str(v) for v in values}) if not numeric else []
    x = lambda j: j.overrides[param] if numeric else cats.index(str(j.overrides[param]))  # also the order
    ncols = max(1, len(metrics))
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4.2), squeeze=False)
    groups: dict[tuple, list[SweepJob]] = {}
    for j in ok:
        groups.setdefault(tuple(str(j.overrides.get(o)) for o in others), []).append(j)
    for ax, metric in zip(axes[0], metrics, strict=False):
        for gkey, members in sorted(groups.items()):
            members = sorted(members, key=x)
            label = ", ".join(f"{o}={v}" for o, v in zip(others, gkey, strict=True)) or None
            ys = [j.metrics.get(metric, math.nan) for j in members]
            ax.plot([x(j) for j in members], ys, "o-", label=label)
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 8:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        ax.set(xlabel=param, ylabel=metric)
        ax.set_title(metric, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    failed = sum(1 for j in jobs if j.status != "ok")
    hidden = f" ({failed} failed job{'s' * (failed != 1)} not shown)" if failed else ""
    return finish_figure(fig, f"Sweep over {param}{hidden}")


def _ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values, numbers ascending, otherwise in order of appearance."""
    distinct = list(dict.fromkeys(values))
    return sorted(distinct) if all(_is_number(v) for v in distinct) else distinct


def pivot(jobs: Sequence[SweepJob], rows: str, cols: str, metric: str) -> tuple[list, list, np.ndarray]:
    """``metric`` of the finished jobs on the grid ``rows`` × ``cols`` (NaN where no job finished)."""
    ok = [j for j in jobs if j.status == "ok" and rows in j.overrides and cols in j.overrides]
    row_values = _ordered([j.overrides[rows] for j in ok])
    col_values = _ordered([j.overrides[cols] for j in ok])
    grid = np.full((len(row_values), len(col_values)), np.nan)
    for j in ok:
        grid[row_values.index(j.overrides[rows]), col_values.index(j.overrides[cols])] = j.metrics.get(
            metric, np.nan)
    return row_values, col_values, grid


def plot_map(jobs: Sequence[SweepJob], rows: str, cols: str, metrics: Sequence[str]) -> Any:
    """One annotated heat map per metric over the two swept parameters."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        row_values, col_values, grid = pivot(jobs, rows, cols, metric)
        ax.imshow(grid, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, fmt(float(v), 3), ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(col_values)), [str(v) for v in col_values], rotation=30, fontsize=8)
        ax.set_yticks(range(len(row_values)), [str(v) for v in row_values], fontsize=8)
        ax.set(xlabel=cols, ylabel=rows)
        ax.set_title(metric.split("/", 1)[-1], fontsize=8)
    fig.tight_layout()
    return fig


def _pivot_markdown(jobs: Sequence[SweepJob], rows: str, cols: str, metric: str) -> str:
    row_values, col_values, grid = pivot(jobs, rows, cols, metric)
    table = [{rows: r, **{str(c): grid[i, k] for k, c in enumerate(col_values)}}
             for i, r in enumerate(row_values)]
    columns = [rows, *map(str, col_values)]
    return f"`{metric}`\n\n" + markdown_table(table, columns, [f"{rows} \\ {cols}", *columns[1:]])


def summarize_sweep(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    metrics: Sequence[str] | None = None) -> ExperimentResult:
    """Build ``sweep_summary.csv``, ``sweep_<param>.png`` per swept parameter and ``sweep_summary.md``.

    ``sweep_dir``: the multirun directory; ``out_dir``: where to write (default ``sweep_dir``);
    ``metrics``: metric names (or fragments) to plot (default: :data:`DEFAULT_METRICS` where present).
    """
    from warplca.plotting import save_png

    root = Path(sweep_dir).expanduser()
    out = Path(out_dir).expanduser() if out_dir else root
    paths = find_jobs(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no Hydra job directories (no */.hydra/overrides.yaml) found")
    jobs = [read_job(p) for p in paths]
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({str(j.overrides.get(k)) for j in jobs}) > 1] or keys
    metric_keys = sorted({k for j in jobs for k in j.metrics})
    rows = [{"job": str(j.path.relative_to(root)) if j.path != root else ".", "status": j.status,
             **{k: j.overrides.get(k) for k in keys}, **j.metrics, "error": j.error} for j in jobs]
    columns = ["job", "status", *keys, *metric_keys, "error"]
    files: dict[str, Path] = {"csv": write_csv(out / "sweep_summary.csv", rows, columns)}
    chosen = _pick_metrics(jobs, metrics)
    plotted = [p for p in swept if any(j.status == "ok" and p in j.overrides for j in jobs)]
    for param in plotted if chosen else []:
        others = [p for p in swept if p != param]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", param)
        files[f"plot:{param}"] = save_png(plot_parameter(jobs, param, others, chosen),
                                          out / f"sweep_{safe}.png")
    if len(plotted) == 2 and chosen:
        files["map"] = save_png(plot_map(jobs, plotted[0], plotted[1], chosen), out / "sweep_map.png")
    failed = [j for j in jobs if j.status != "ok"]
    md = [f"## Sweep summary: `{root}`", "", f"{len(jobs)} jobs ({len(jobs) - len(failed)} ok, {len(failed)} "
          f"failed); swept: {', '.join(f'`{p}`' for p in swept) or '–'}.", "",
          markdown_table(rows, ["job", "status", *swept, *chosen])]
    md += [f"![sweep over {p}]({f.name})" for k, f in files.items() if k.startswith("plot:") for p in [k[5:]]]
    if "map" in files:
        md += ["", f"### Maps over {plotted[0]} × {plotted[1]}", "",
               *(_pivot_markdown(jobs, plotted[0], plotted[1], metric) for metric in chosen),
               f"![map]({files['map'].name})"]
    if failed:
        md += ["", "Failed jobs:", *[f"- `{j.name}`: {j.error}" for j in failed]]
    md += ["", f"Regenerate: `python evaluate.py sweep_dir={root}`"]
    text = "\n".join(md) + "\n"
    files["md"] = write_text_atomic(out / "sweep_summary.md", "# warp-lca sweep\n\n" + text)
    shown = [{k: (fmt(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return ExperimentResult(
        name="sweep", metrics={"sweep/jobs": float(len(jobs)), "sweep/failed": float(len(failed))},
        markdown=text, files=files, tables={"sweep/summary": (columns, shown)},
        notes=[f"{j.name}: {j.error}" for j in failed])
