"""Hydra-edge helpers: instantiate loggers, callbacks and trainers from config, seeding, the task wrapper.

These are the only places that turn ``_target_`` configs into Lightning objects, so the rules live
here once: loggers and callbacks are dicts keyed by name (``logger.csv=null`` drops one), a
trainer's per-stage defaults come from ``model.<stage>.trainer`` and are overridden by any key the
``trainer`` group sets to a non-null value, and the task wrapper always closes wandb.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "close_wandb",
    "compose_config",
    "default_config_dir",
    "evaluation_device_name",
    "flatten_metrics",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "is_user_error",
    "rank_suffix",
    "seed_everything",
    "task_wrapper",
    "to_container",
]


def to_container(node: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (dicts/lists pass through)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def rank_suffix() -> str:
    """``""`` in the global-rank-0 process, ``".rank<N>"`` (``".node<M>.rank<N>"``) in the others.

    Read from ``RANK`` (torchrun, srun) or ``LOCAL_RANK`` / ``NODE_RANK`` (set by Lightning for the
    processes it launches) before any process group exists, so it can name per-rank files in the
    Hydra config: ``${warplca.rank_suffix:}``.
    """
    rank = os.environ.get("RANK")
    if rank is not None:
        return "" if rank in ("", "0") else f".rank{rank}"
    local, node = os.environ.get("LOCAL_RANK", "0") or "0", os.environ.get("NODE_RANK", "0") or "0"
    if local == "0" and node == "0":
        return ""
    return f".rank{local}" if node == "0" else f".node{node}.rank{local}"


if not OmegaConf.has_resolver("warplca.rank_suffix"):
    OmegaConf.register_new_resolver("warplca.rank_suffix", rank_suffix)


def evaluation_device_name(cfg: Any) -> str:
    """Where a stage evaluates outside the Trainer: ``cpu`` for ``trainer.accelerator=cpu``, else ``auto``."""
    trainer = to_container(cfg.get("trainer")) or {}
    return "cpu" if str(trainer.get("accelerator", "auto")) == "cpu" else "auto"


def seed_everything(seed: int | None) -> None:
    """Seed python, numpy and torch (and DataLoader workers) when ``seed`` is not None."""
    if seed is not None:
        pl.seed_everything(int(seed), workers=True, verbose=False)


def _entries(group: Any, what: str) -> list[tuple[str, Any]]:
    """(name, config) pairs of a dict-of-configs group; None entries (dropped with ``x=null``) skipped."""
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
        out.append((str(name), conf))
    return out


def instantiate_loggers(group: Any, version: str | None = None, run_name: str | None = None,
                        run_group: str | None = None) -> list[Logger]:
    """Lightning loggers from a ``logger`` group (dict name -> config).

    ``version`` becomes the sub-directory of file loggers (CSV / TensorBoard) whose config leaves it
    null, so each pipeline stage writes its own ``metrics.csv`` (``<version>_1``, … on a rerun);
    wandb runs get ``run_name``, ``run_group`` and ``job_type=version`` unless the config sets them.
    """
    loggers: list[Logger] = []
    for name, conf in _entries(group, "logger"):
        cls = get_class(conf["_target_"])
        kwargs: dict[str, Any] = {}
        if cls.__name__ == "WandbLogger":
            if conf.get("name") is None and run_name is not None:
                kwargs["name"] = run_name
            if conf.get("group") is None and run_group is not None:
                kwargs["group"] = run_group
            if conf.get("job_type") is None and version is not None:
                kwargs["job_type"] = version
        elif "version" in conf and conf.get("version") is None and version is not None:
            kwargs["version"] = _fresh_version(conf.get("save_dir"), conf.get("name"), version)
        try:
            loggers.append(instantiate(conf, **kwargs))
        except Exception as exc:
            raise RuntimeError(f"could not instantiate logger '{name}' ({conf['_target_']}): {exc}") from exc
    return loggers


def _fresh_version(save_dir: Any, name: Any, version: str) -> str:
    """``version``, or ``version_1``, ``version_2``, … when a previous invocation (a resumed or forced
    stage) already wrote ``<save_dir>/<name>/<version>``: file loggers never overwrite old logs."""
    if not save_dir:
        return version
    base = Path(str(save_dir)) / str(name or "")
    candidate, n = version, 0
    while (base / candidate).exists():
        n += 1
        candidate = f"{version}_{n}"
    return candidate


def instantiate_callbacks(group: Any, checkpoint_dir: str | None = None) -> list[Callback]:
    """Lightning callbacks from a ``callbacks`` group (dict name -> config).

    ``checkpoint_dir`` is given to every ``ModelCheckpoint`` whose ``dirpath`` is null.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks: list[Callback] = []
    for name, conf in _entries(group, "callbacks"):
        cls = get_class(conf["_target_"])
        kwargs: dict[str, Any] = {}
        if issubclass(cls, ModelCheckpoint) and conf.get("dirpath") is None and checkpoint_dir is not None:
            kwargs["dirpath"] = checkpoint_dir
        try:
            callbacks.append(instantiate(conf, **kwargs))
        except Exception as exc:
            target = conf["_target_"]
            raise RuntimeError(f"could not instantiate callback '{name}' ({target}): {exc}") from exc
    return callbacks


def close_wandb() -> None:
    """Finish the current wandb run, if wandb was imported and a run is open (a no-op otherwise).

    Without this a later ``WandbLogger`` in the same process (the next stage, the next sweep job)
    silently reuses the unfinished run.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
    except Exception:  # never mask the task's own outcome
        log.warning("wandb.finish() failed", exc_info=True)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the config or the files are wrong rather than the code: a ``ValueError``
    (a bad config value, :class:`~warplca.config_validation.ConfigError`), a ``FileNotFoundError`` (a
    missing artifact, :class:`~warplca.data.datamodule.DatasetNotFoundError`) or a
    :class:`~warplca.tasks.stages.StageNotAvailableError`. Their messages name the key or file and the fix."""
    from warplca.tasks.stages import StageNotAvailableError

    return isinstance(exc, (ValueError, FileNotFoundError, StageNotAvailableError))


def _started_by_hydra_app() -> bool:
    """Whether this call runs inside Hydra's ``run_job`` (``python train.py``, ``warplca-train``, …) rather
    than as a plain function call (tests, notebooks, :func:`compose_config`)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run_job" and frame.f_globals.get("__name__") == "hydra.core.utils":
            return True
        frame = frame.f_back
    return False


def task_wrapper(fn: F) -> F:
    """Decorate a task ``fn(cfg)``: record a failure, report it once, always close wandb.

    A failure is recorded as ``FAILED`` in the job directory (:mod:`warplca.runtime`: the error, then the
    traceback). Then:

    - inside a Hydra multirun the wrapper logs the error with its traceback and returns
      :data:`warplca.runtime.FAILED_METRICS` instead of raising, so the sweep goes on with the other jobs
      (``+fail_fast=true`` re-raises);
    - a single run started by the Hydra app (``python train.py …``) that fails with a user error
      (:func:`is_user_error`: a bad config value, a missing dataset or artifact) logs the message once —
      console and job log, no traceback — and exits with status 1 (``SystemExit(1)``); with
      ``HYDRA_FULL_ERROR=1`` it re-raises, and Python prints the full traceback;
    - otherwise (a bug, or a plain function call from tests or notebooks) it logs one line and
      re-raises the exception unchanged; whoever catches it (Hydra, Python, the caller) shows the
      traceback, once.
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
                    and _started_by_hydra_app()):
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
            for sub, v in flatten_metrics(value, sep).items():
                out[f"{key}{sep}{sub}"] = v
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


def default_config_dir() -> Path:
    """The Hydra config tree shipped inside the package (``warplca/conf``)."""
    from warplca.config_defaults import config_dir

    return config_dir()


def compose_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None,
                   config_name: str = "train", config_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose a config outside ``@hydra.main`` (tests, notebooks) with ``${hydra:...}`` resolvable.

    The Hydra node is kept (``return_hydra_config=True``) and registered with ``HydraConfig``;
    ``output_dir`` becomes ``hydra.runtime.output_dir`` (so ``paths.output_dir``) and
    ``hydra.run.dir``. Without it the run directory is the composed ``run_dir``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    conf_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not conf_dir.is_dir():
        raise FileNotFoundError(f"config directory {conf_dir} does not exist")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        out = Path(output_dir) if output_dir is not None else Path(str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = str(out.resolve())
        cfg.hydra.run.dir = str(out)
        if output_dir is not None and "run_dir" in cfg:
            cfg.run_dir = str(out)
        if not cfg.hydra.runtime.get("cwd"):
            cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig().set_config(cfg)
    return cfg
