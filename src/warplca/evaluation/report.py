"""Writing evaluation results: metrics.json (merged), CSV tables, report.md sections, logger output.

:func:`write_result` is the one writer of every :class:`~warplca.evaluation.common.ExperimentResult`.
Report sections sit between ``<!-- warplca:<name> -->`` markers, so re-running one experiment replaces
only its own section. ``metrics.json`` is merged and read with :func:`~warplca.serialization.merge_metrics`
and :func:`~warplca.serialization.read_metrics` (re-exported here), as the pipeline stages do.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from warplca.serialization import REPORT_FILE, merge_metrics, read_metrics, write_text_atomic

if TYPE_CHECKING:
    from warplca.evaluation.common import ExperimentResult

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_NAME", "flatten", "fmt", "log_to_loggers", "markdown_table", "merge_metrics", "read_csv",
    "read_metrics", "write_csv", "write_report_section", "write_result", "write_text_atomic",
]

REPORT_NAME = REPORT_FILE
_HEADER = "# warp-lca evaluation report\n"


# -- files ---------------------------------------------------------------------------------------------
def _scalar(value: Any) -> Any:
    """0-d tensors and numpy scalars as plain Python numbers; anything else unchanged."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts -> one level with ``sep``-joined keys (how sweep summaries read metrics.json)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts -> CSV with a header; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return write_text_atomic(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    value = _scalar(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """A CSV written by :func:`write_csv` as a list of string dicts."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# -- markdown ------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: ints as ints, floats with ``digits`` significant digits, None/NaN as '–'."""
    if value is None:
        return "–"
    value = _scalar(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) restricted to ``columns``."""
    headers = list(headers) if headers is not None else list(columns)
    body = [[fmt(row.get(c), digits) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out) + "\n"


def write_report_section(out_dir: str | os.PathLike, name: str, markdown: str,
                         filename: str = REPORT_NAME) -> Path:
    """Replace (or append) the section ``name`` of ``<out_dir>/report.md``; other sections stay. Each
    section ends with the commit and command that produced it (:func:`warplca.source.stamp`)."""
    from warplca.source import stamp

    path = Path(out_dir) / filename
    start, end = f"<!-- warplca:{name} -->", f"<!-- /warplca:{name} -->"
    block = f"{start}\n{markdown.rstrip()}\n\n{stamp()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text, found = pattern.subn(lambda _: block, text, count=1)
    return write_text_atomic(path, text if found else text.rstrip() + "\n\n" + block)


# -- the writer ----------------------------------------------------------------------------------
def write_result(result: ExperimentResult, out_dir: str | os.PathLike, loggers: Iterable[Any] | None = None,
                 prefix: str = "eval", metrics_section: str | None = None) -> dict[str, Path]:
    """Write everything an experiment produces into ``out_dir``; returns the files (``result.files``).

    Metrics go into ``metrics.json`` only under a ``metrics_section`` (None: a pipeline stage whose runner
    stores what it returns); every logger key is under ``prefix``.
    """
    from warplca.plotting import save_png

    out_dir = Path(out_dir)
    for filename, (columns, rows) in result.csv.items():
        result.files[filename] = write_csv(out_dir / filename, rows, columns)
    for key, figure in result.figures.items():
        result.files[key] = save_png(figure.draw(), out_dir / figure.filename)
    write_report_section(out_dir, result.name, result.markdown)
    if metrics_section is not None:
        merge_metrics(out_dir, result.metrics, section=metrics_section)
    log_to_loggers(loggers, {f"{prefix}/{k}": v for k, v in result.metrics.items()},
                   images={f"{prefix}/{result.name}/{key}": result.files[key] for key in result.figures},
                   tables={f"{prefix}/{k}": v for k, v in result.tables.items()},
                   text={f"{prefix}/{result.name}/report": result.markdown})
    return result.files


# -- loggers ---------------------------------------------------------------------------------------------
def log_to_loggers(loggers: Iterable[Any] | None, metrics: Mapping[str, Any] | None = None,
                   images: Mapping[str, Any] | None = None,
                   tables: Mapping[str, tuple[Sequence[str], Sequence[Mapping[str, Any]]]] | None = None,
                   text: Mapping[str, str] | None = None) -> None:
    """Send evaluation results to Lightning loggers: flat scalars (NaN/None skipped) to all; images (PNG
    path or (H, W, 3) array) and markdown ``text`` to wandb and TensorBoard; ``tables`` (columns, rows) to
    wandb only (``wandb.Table``; elsewhere the CSV files hold them). A failing logger only warns."""
    loggers = [lg for lg in (loggers or []) if lg is not None]
    if not loggers:
        return
    scalars = {}
    for k, v in (metrics or {}).items():
        with contextlib.suppress(TypeError, ValueError):  # None, strings: not scalars
            if math.isfinite(f := float(v)):
                scalars[k] = f
    arrays = {k: _as_image(v) for k, v in (images or {}).items()}
    for lg in loggers:
        kind = type(lg).__name__
        try:
            if scalars:
                lg.log_metrics(scalars)
            if kind == "WandbLogger":
                for key, arr in arrays.items():
                    lg.log_image(key=key, images=[arr])
                for key, (cols, rows) in (tables or {}).items():
                    data = [[_scalar(r.get(c)) for c in cols] for r in rows]
                    lg.log_table(key=key, columns=list(cols), data=data)
                for key, md in (text or {}).items():
                    lg.log_text(key=key, columns=["markdown"], data=[[md]])
            elif kind == "TensorBoardLogger":
                exp = lg.experiment
                for key, arr in arrays.items():
                    exp.add_image(key, arr, dataformats="HWC")
                for key, md in (text or {}).items():
                    exp.add_text(key, md)
            if hasattr(lg, "save"):
                lg.save()
        except Exception as exc:  # a logger failing must not lose the files already written
            log.warning("logging evaluation results to %s failed: %s", kind, exc)


def _as_image(value: Any) -> np.ndarray:
    """A PNG path or an array -> an (H, W, 3) float array in [0, 1]."""
    if isinstance(value, (str, os.PathLike)):
        import matplotlib.image as mpimg

        arr = mpimg.imread(os.fspath(value))
    else:
        arr = np.asarray(value)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.float32))


# -- README results page --------------------------------------------------------------------------------
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_SECTION = re.compile(r"<!-- warplca:([\w.-]+) -->\n(.*?)<!-- /warplca:\1 -->", re.DOTALL)
#: section order of the results page (others follow in report order)
SECTION_ORDER = ("convergence", "thresholds", "denoise", "ood", "robustness", "sweep", "pipeline")


def write_results_page(out_dir: str | os.PathLike, page: str | os.PathLike, command: str,
                       figures_dir: str | os.PathLike | None = None, title: str = "Results") -> Path:
    """Turn ``<out_dir>/report.md`` into a README-ready page at ``page`` (e.g. ``docs/results.md``).

    Linked figures are copied into ``figures_dir`` (default: ``figures/`` next to the page) and relinked
    relative to the page; ``command``, the command that regenerates the page, is printed at the top.
    """
    out_dir = Path(out_dir)
    page = Path(page).expanduser()
    report = out_dir / REPORT_NAME
    if not report.is_file():
        raise FileNotFoundError(f"{report}: no report to build the results page from; run an evaluation "
                                f"first (python evaluate.py run_dir={out_dir} eval=convergence)")
    figures = Path(figures_dir) if figures_dir is not None else page.parent / "figures"
    text = report.read_text(encoding="utf-8")
    sections = {m.group(1): m.group(2).strip() for m in _SECTION.finditer(text)}
    order = [n for n in SECTION_ORDER if n in sections] + [n for n in sections if n not in SECTION_ORDER]
    body = "\n\n".join(sections[n] for n in order) if sections else text.replace(_HEADER, "", 1)

    def relink(m: re.Match[str]) -> str:
        src = out_dir / m.group(2)
        if not src.is_file():
            return m.group(0)
        figures.mkdir(parents=True, exist_ok=True)
        dst = figures / src.name
        shutil.copyfile(src, dst)
        return f"![{m.group(1)}]({os.path.relpath(dst, page.parent).replace(os.sep, '/')})"

    body = _IMAGE_LINK.sub(relink, body)
    head = (f"# {title}\n\n<!-- generated by warp-lca's evaluate.py; edit the code, not this file -->\n\n"
            f"Regenerate this page (from the repository root):\n\n```bash\n{command}\n```\n\n"
            f"Source run: `{out_dir}`.\n\n")
    return write_text_atomic(page, head + body.strip() + "\n")
