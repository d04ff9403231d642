"""Hydra-edge helpers: instantiate loggers, callbacks and trainers from config, seeding, the task wrapper,
the OmegaConf resolvers the configs use (:func:`register_resolvers`).

Loggers and callbacks are dicts keyed by name (``logger.csv=null`` drops one); the task wrapper
always closes wandb.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["RESOLVERS", "close_wandb", "evaluation_device_name", "flatten_metrics", "get_metric_value",
           "hydra_entry_point", "instantiate_callbacks", "instantiate_loggers", "is_user_error",
           "rank_suffix", "register_resolvers", "seed_everything", "started_by_entry_point", "task_wrapper",
           "to_container"]


def to_container(node: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (dicts/lists pass through)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def rank_suffix() -> str:
    """``""`` on global rank 0, else ``".rank<N>"`` (``".node<M>.rank<N>"``), from the environment, so the
    Hydra config can name per-rank files before any process group exists: ``${warplca.rank_suffix:}``."""
    rank = os.environ.get("RANK")
    if rank is not None:
        return "" if rank in ("", "0") else f".rank{rank}"
    local, node = os.environ.get("LOCAL_RANK", "0") or "0", os.environ.get("NODE_RANK", "0") or "0"
    if local == "0" and node == "0":
        return ""
    return f".rank{local}" if node == "0" else f".node{node}.rank{local}"


#: the OmegaConf resolvers the Hydra configs use, by name (``${warplca.rank_suffix:}`` in hydra/default.yaml)
RESOLVERS: dict[str, Callable[..., Any]] = {"warplca.rank_suffix": rank_suffix}


def register_resolvers() -> None:
    """Register :data:`RESOLVERS` with OmegaConf (idempotent). Hydra resolves the job-logging file name
    with them, so every place that composes a config calls this first: the entry points of
    :mod:`warplca.cli` and :func:`warplca.config.compose_config`."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def evaluation_device_name(cfg: Any) -> str:
    """Where a stage evaluates outside the Trainer: ``cpu`` for ``trainer.accelerator=cpu``, else ``auto``."""
    trainer = to_container(cfg.get("trainer")) or {}
    return "cpu" if str(trainer.get("accelerator", "auto")) == "cpu" else "auto"


def seed_everything(seed: int | None) -> None:
    """Seed python, numpy and torch (and DataLoader workers) when ``seed`` is not None."""
    if seed is not None:
        pl.seed_everything(int(seed), workers=True, verbose=False)


def _instantiate_group(group: Any, what: str, kind: str,
                       extra: Callable[[type, Any], dict[str, Any]]) -> list[Any]:
    """Instantiate each entry of a dict-of-configs group (``x=null`` entries skipped) with the keyword
    arguments ``extra(cls, conf)``; a failure names the entry."""
    if group is None:
        return []
    if not isinstance(group, (Mapping, DictConfig)):
        raise ValueError(f"{what} config must be a mapping of name -> {{_target_: ...}}, "
                         f"got {type(group).__name__}")
    out = []
    for name, conf in group.items():
        if conf is None:
            continue
        if not isinstance(conf, (Mapping, DictConfig)) or "_target_" not in conf:
            raise ValueError(f"{what}.{name} must be a config with a _target_, got {conf!r}")
        kwargs = extra(get_class(conf["_target_"]), conf)
        try:
            out.append(instantiate(conf, **kwargs))
        except Exception as exc:
            raise RuntimeError(f"could not instantiate {kind} '{name}' ({conf['_target_']}): {exc}") from exc
    return out


def instantiate_loggers(group: Any, version: str | None = None, run_name: str | None = None,
                        run_group: str | None = None) -> list[Logger]:
    """Lightning loggers from a ``logger`` group (dict name -> config). File loggers whose ``version`` is
    null write to ``<version>/`` (``<version>_1``, … on a rerun); wandb runs get ``run_name``,
    ``run_group`` and ``job_type=version`` unless the config sets them."""
    def extra(cls: type, conf: Any) -> dict[str, Any]:
        if cls.__name__ == "WandbLogger":
            wanted = {"name": run_name, "group": run_group, "job_type": version}
            return {k: v for k, v in wanted.items() if conf.get(k) is None and v is not None}
        if "version" in conf and conf.get("version") is None and version is not None:
            return {"version": _fresh_version(conf.get("save_dir"), conf.get("name"), version)}
        return {}

    return _instantiate_group(group, "logger", "logger", extra)


def _fresh_version(save_dir: Any, name: Any, version: str) -> str:
    """``version``, or ``version_1``, ``version_2``, … when ``<save_dir>/<name>/<version>`` exists:
    file loggers never overwrite old logs."""
    if not save_dir:
        return version
    base = Path(str(save_dir)) / str(name or "")
    candidate, n = version, 0
    while (base / candidate).exists():
        n += 1
        candidate = f"{version}_{n}"
    return candidate


def instantiate_callbacks(group: Any, checkpoint_dir: str | None = None) -> list[Callback]:
    """Lightning callbacks from a ``callbacks`` group (dict name -> config); ``checkpoint_dir`` is given
    to every ``ModelCheckpoint`` whose ``dirpath`` is null."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def extra(cls: type, conf: Any) -> dict[str, Any]:
        if issubclass(cls, ModelCheckpoint) and conf.get("dirpath") is None and checkpoint_dir is not None:
            return {"dirpath": checkpoint_dir}
        return {}

    return _instantiate_group(group, "callbacks", "callback", extra)


def close_wandb() -> None:
    """Finish the open wandb run, if any, so a later ``WandbLogger`` in this process does not reuse it."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
    except Exception:  # never mask the task's own outcome
        log.warning("wandb.finish() failed", exc_info=True)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` blames the config or the files, not the code (a ``ValueError``, such as a
    :class:`~warplca.config.ConfigError` or a
    :class:`~warplca.tasks.provenance.ProvenanceMismatchError`, or a ``FileNotFoundError``)."""
    return isinstance(exc, (ValueError, FileNotFoundError))


#: set by :func:`hydra_entry_point` while a ``@hydra.main`` entry point (:mod:`warplca.cli`) runs its task
_ENTRY_POINT: ContextVar[bool] = ContextVar("warplca_hydra_entry_point", default=False)


@contextlib.contextmanager
def hydra_entry_point() -> Iterator[None]:
    """Mark the task calls inside as started by a command-line entry point (``python train.py``): there
    :func:`task_wrapper` reports a user error as a message and exit status 1 instead of a traceback. A
    task called as a function (tests, notebooks; also after :func:`warplca.config.compose_config`)
    raises as usual."""
    token = _ENTRY_POINT.set(True)
    try:
        yield
    finally:
        _ENTRY_POINT.reset(token)


def started_by_entry_point() -> bool:
    """Whether the running task was started by a command-line entry point (see :func:`hydra_entry_point`)."""
    return _ENTRY_POINT.get()


def task_wrapper(fn: F) -> F:
    """Decorate a task ``fn(cfg)``: record a failure (``FAILED`` in the job directory), report it once,
    always close wandb.

    In a multirun a failure is logged and :data:`warplca.runtime.FAILED_METRICS` returned, so the sweep
    goes on (``+fail_fast=true`` re-raises). A user error (:func:`is_user_error`) in a run started by a
    command-line entry point (:func:`hydra_entry_point`) logs its message without a traceback and exits
    with status 1 (``HYDRA_FULL_ERROR=1`` re-raises). Anything else is logged in one line and re-raised
    unchanged.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        from warplca import runtime

        cfg = args[0] if args else kwargs.get("cfg")
        job = runtime.job_dir(cfg) if cfg is not None else None
        runtime.clear_failure(job)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            marker = runtime.record_failure(job, exc)
            if cfg is not None and runtime.continue_on_failure(cfg):
                log.exception("task %s failed", fn.__name__)
                log.error("job failed (recorded in %s); the sweep goes on with the next job", marker)
                return dict(runtime.FAILED_METRICS)
            where = f" (traceback in {marker})" if marker is not None else ""
            if (is_user_error(exc) and os.environ.get("HYDRA_FULL_ERROR") != "1"
                    and started_by_entry_point()):
                log.error("%s: %s", type(exc).__name__, exc)
                log.error("%s failed%s; HYDRA_FULL_ERROR=1 prints the traceback", fn.__name__, where)
                raise SystemExit(1) from None
            log.error("task %s failed: %s: %s%s", fn.__name__, type(exc).__name__, exc, where)
            raise
        finally:
            close_wandb()

    return wrapped  # type: ignore[return-value]


def flatten_metrics(nested: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """``{"dictionary": {"test/psnr": 27.0}}`` -> ``{"dictionary/test/psnr": 27.0}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update({f"{key}{sep}{sub}": v for sub, v in flatten_metrics(value, sep).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def get_metric_value(metrics: Mapping[str, float], name: str | None) -> float | None:
    """The metric ``name`` (a flat ``stage/key`` name) for a sweeper; None when no name is given."""
    if not name:
        return None
    from warplca.runtime import FAILED_KEY

    if metrics.get(FAILED_KEY):  # a failed sweep job: NaN tells the sweeper (Optuna: a failed trial)
        return float("nan")
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not produced by this run; "
                       f"available: {sorted(metrics)}")
    value = float(metrics[name])
    log.info("optimized metric %s = %g", name, value)
    return value
