"""Atomic, self-describing artifact files and the names of the files a run directory holds.

Artifacts are a ``torch.save`` of ``{"format", "version", **payload}`` written to a temporary file and
renamed into place; loading checks the format and names the file. JSON files (``metrics.json``,
provenance records) are strict JSON: NaN and ±Inf are written as ``null``, which every JSON reader accepts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BUNDLE_FILE", "CLASSIFIER_FILE", "DICTIONARY_FILE", "METRICS_FILE", "PROVENANCE_DIR",
           "REPORT_FILE", "ROBUSTNESS_FILE", "TARGETS_DIR", "VERSION", "atomic_path", "dumps_json",
           "load_checked", "merge_metrics", "read_json_object", "read_metrics", "save_atomic",
           "to_json_value", "write_json_atomic", "write_text_atomic"]

VERSION = 1

# -- the run directory: every writer and reader of a run names its files with these -------------------------
DICTIONARY_FILE = "dictionary.pt"      # the learned dictionary (stage dictionary)
TARGETS_DIR = "targets"                # the cold-LCA state caches, one folder per split (stage targets)
BUNDLE_FILE = "warp_lca.pt"            # the WARP-LCA bundle (stage warp)
CLASSIFIER_FILE = "classifier.ckpt"    # the main front end's classifier (stage classify)
ROBUSTNESS_FILE = "robustness.csv"     # the noisy-classification table (stage classify)
REPORT_FILE = "report.md"              # the report (stage report, evaluate.py)
METRICS_FILE = "metrics.json"          # every stage's metrics, one section per stage
PROVENANCE_DIR = "provenance"          # ``<stage>.json``: the settings each artifact was made with


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, fsync'ed and renamed onto it on success, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def save_atomic(payload: dict[str, Any], path: str | os.PathLike, fmt: str) -> Path:
    """Write ``payload`` tagged with format ``fmt`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        torch.save({"format": fmt, "version": VERSION, **payload}, tmp)
    return Path(path)


def load_checked(path: str | os.PathLike, fmt: str,
                 map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an artifact written by :func:`save_atomic`, refusing missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a {fmt} artifact)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: cannot be read as a {fmt} artifact (truncated or corrupt?): "
                         f"{exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: is not a {fmt} artifact (found format {found!r})")
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{path}: written by a newer warplca (version {obj['version']} > {VERSION})")
    return obj


# -- strict JSON ---------------------------------------------------------------------------------------------
def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON data: tensors and numpy values as numbers or lists, NaN/±Inf as None
    (JSON has neither; null reads as "not available"), mappings with string keys, tuples as lists, and
    anything else as a float if it converts, else its string."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    try:
        return to_json_value(float(value))
    except (TypeError, ValueError):
        return str(value)


def dumps_json(obj: Any) -> str:
    """``obj`` (see :func:`to_json_value`) as indented, key-sorted, strict JSON text ending in a newline."""
    return json.dumps(to_json_value(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (:func:`dumps_json`) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, dumps_json(obj))


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path`` (``{}`` when the file is missing); a corrupt file or one holding
    something else than an object raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it to start afresh") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _metrics_file(path: str | os.PathLike) -> Path:
    """``path`` itself for a ``.json`` file, else ``<path>/metrics.json`` (a run or output directory)."""
    path = Path(path)
    return path if path.suffix == ".json" and not path.is_dir() else path / METRICS_FILE


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The metrics of a run: ``path`` is ``metrics.json`` or the directory holding it (``{}`` when absent)."""
    return read_json_object(_metrics_file(path))


def merge_metrics(path: str | os.PathLike, metrics: Mapping[str, Any],
                  section: str | None = None) -> dict[str, Any]:
    """Merge ``metrics`` into ``metrics.json`` (``path``: the file or its directory), atomically and as
    strict JSON; returns the merged contents.

    With ``section`` the metrics go into that sub-object (``{"<stage>": {"<key>": value}}``, ``"eval"``
    for ``evaluate.py``); other keys are kept, keys in ``metrics`` replace older values.
    """
    path = _metrics_file(path)
    data = to_json_value(read_json_object(path))  # a file written with NaN by older versions: now null
    new = to_json_value(dict(metrics))
    if section is None:
        data.update(new)
    else:
        entry = data.get(section)
        data[section] = {**(entry if isinstance(entry, dict) else {}), **new}
    write_json_atomic(path, data)
    return data
