"""Atomic, self-describing artifact files (dictionaries, bundles, manifests).

Every artifact is a ``torch.save`` of ``{"format": <kind>, "version": <int>, **payload}`` written
to a temporary file in the same directory and renamed into place, so a crash never leaves a
half-written artifact behind. Loading checks the format and names the file in every error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

VERSION = 1


def save_atomic(payload: dict[str, Any], path: str | os.PathLike, fmt: str) -> Path:
    """Write ``payload`` tagged with format ``fmt`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": fmt, "version": VERSION, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the artifact normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
