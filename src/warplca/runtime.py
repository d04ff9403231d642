"""Process-level facts a task needs (job directory, rank, multirun) and how a failed sweep job is recorded:
Hydra's basic sweeper would re-raise a job's exception and end the multirun, so inside one (unless
``+fail_fast=true``) :func:`warplca.tasks.utils.task_wrapper` catches it, writes a ``FAILED`` marker
(:func:`record_failure`) and returns :data:`FAILED_METRICS` (NaN for the sweeper) instead."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from warplca.serialization import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["FAILED", "FAILED_KEY", "FAILED_METRICS", "check_checkpoint", "clear_failure",
           "continue_on_failure", "global_rank", "is_multirun", "job_dir", "read_failure", "record_failure"]

#: the marker file of a failed job (first line: ``<ExceptionType>: <message, one line>``; then the traceback)
FAILED = "FAILED"
#: the metric a failed job returns (``get_metric_value`` turns it into NaN for sweepers)
FAILED_KEY = "job/failed"
FAILED_METRICS: dict[str, float] = {FAILED_KEY: 1.0}


def global_rank() -> int:
    """This process's global rank (0 without DDP), as Lightning sets it once the strategy is up."""
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m`` / ``hydra.mode=MULTIRUN``)."""
    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def job_dir(cfg: Any) -> Path | None:
    """The job's output directory: ``cfg.paths.output_dir``, else Hydra's runtime output dir."""
    with contextlib.suppress(Exception):
        out = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
        if out:
            return Path(str(out))
    with contextlib.suppress(Exception):
        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    return None


def continue_on_failure(cfg: Any) -> bool:
    """Whether a failing job is recorded and returns instead of raising (a multirun without fail_fast)."""
    fail_fast = False
    with contextlib.suppress(Exception):
        fail_fast = bool(cfg.get("fail_fast", False))
    return is_multirun() and not fail_fast


def record_failure(directory: str | os.PathLike | None, exc: BaseException) -> Path | None:
    """Write ``<directory>/FAILED`` (error line + traceback) on rank 0; returns its path (None elsewhere)."""
    if directory is None or global_rank() != 0:
        return None
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(summary) > 500:
        summary = summary[:497] + "..."
    body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path = Path(directory) / FAILED
    try:
        write_text_atomic(path, f"{summary}\n\nfailed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{body}")
    except OSError:
        log.warning("could not write the failure marker %s", path, exc_info=True)
        return None
    return path


def clear_failure(directory: str | os.PathLike | None) -> None:
    """Remove a stale ``FAILED`` marker when a job (re)starts in ``directory`` (rank 0 only)."""
    if directory is not None and global_rank() == 0:
        (Path(directory) / FAILED).unlink(missing_ok=True)


def read_failure(directory: str | os.PathLike) -> str | None:
    """The first line of ``<directory>/FAILED`` (the error), or None if the job did not fail."""
    path = Path(directory) / FAILED
    if not path.is_file():
        return None
    try:
        with path.open() as fh:
            return fh.readline().strip() or "failed"
    except OSError:
        return "failed"


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a readable Lightning checkpoint, else a ValueError naming the file and the fix
    (a truncated or foreign one would fail deep inside ``fit`` without naming it)."""
    import zipfile

    import torch

    path = Path(path)
    fix = "delete it to restart the stage from scratch, or pass resume=false"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: not a readable checkpoint (the file is empty); {fix}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt: no zip directory); {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt: {exc}); {fix}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a Lightning checkpoint (found {found!r}); {fix}")
    return path
