"""Atomic, self-describing artifact files: a ``torch.save`` of ``{"format", "version", **payload}``
written to a temporary file and renamed into place; loading checks the format and names the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

VERSION = 1


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
