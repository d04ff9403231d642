"""Lightning callbacks for reliability (NaN/Inf guard, RNG state, requeue on SLURM's warning signal, a DDP
progress-bar deadlock workaround) and the GPU path (channels_last); :func:`ensure_default_callbacks`."""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["ChannelsLast", "NonFiniteBatchError", "NonFiniteGuard", "RNGState", "RequeueCheckpoint",
           "RequeueExit", "SyncEpochMetrics", "ensure_default_callbacks", "first_nonfinite"]

#: the step methods the guard can skip (``predict_step`` is never skipped: a cache must be complete)
_STEPS = {"train": "training_step", "val": "validation_step", "test": "test_step"}
_MARK = "_warplca_nonfinite_guard"


class NonFiniteBatchError(RuntimeError):
    """A batch (or the gradients it produced) contains NaN or Inf values."""


def _tensors(batch: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a (nested) batch, with its position (``batch[0]['x']``)."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, (dict, list, tuple)):
        for key, value in batch.items() if isinstance(batch, dict) else enumerate(batch):
            yield from _tensors(value, f"{path}[{key!r}]")


def first_nonfinite(batch: Any, path: str = "batch") -> tuple[str, Tensor] | None:
    """The first floating-point tensor in a (nested) batch with NaN/Inf values, with its position."""
    inexact = ((p, t) for p, t in _tensors(batch, path) if t.is_floating_point() or t.is_complex())
    return next(((p, t) for p, t in inexact if not bool(torch.isfinite(t).all())), None)


def _describe(where: str, t: Tensor) -> str:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{where} (shape {tuple(t.shape)}, {t.dtype}) has {nan} NaN and {inf} Inf values"


def _any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """``flag`` on any rank (one tiny all-reduce under DDP, so all ranks decide together)."""
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if trainer.world_size > 1 else flag


class NonFiniteGuard(Callback):
    """Stop on (default) or skip (``skip=True``) batches with NaN/Inf inputs or gradients.

    A bad batch raises :class:`NonFiniteBatchError` naming stage, epoch and batch index; with ``skip``
    a warning names it and ``skipped`` records ``(stage, epoch, batch_idx)`` (predict batches are never
    skipped). Under DDP all ranks decide together, and a skipped training step still runs (Lightning
    requires it) on zeroed inputs, its gradients dropped before the optimiser step.
    ``check_gradients``: also check the gradients before every optimiser step.
    """

    def __init__(self, skip: bool = False, check_gradients: bool = True) -> None:
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be True or False, got {skip!r}")
        self.skip = skip
        self.check_gradients = bool(check_gradients)
        self.skipped: list[tuple[str, int, int]] = []
        self._skip_now = self._drop_update = False
        self._batch: tuple[str, int, int] = ("train", 0, 0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.skip:
            return
        for name in _STEPS.values():
            current = getattr(pl_module, name, None)
            if current is not None and not getattr(current, _MARK, False):
                setattr(pl_module, name, self._wrap(current))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in _STEPS.values():
            if getattr(pl_module.__dict__.get(name), _MARK, False):
                delattr(pl_module, name)

    def _wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(step)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self._skip_now:
                return None  # no forward, no backward, no optimiser update
            return step(*args, **kwargs)

        setattr(guarded, _MARK, True)
        return guarded

    def _check_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int, stage: str) -> None:
        found = first_nonfinite(batch)
        self._batch = (stage, int(trainer.current_epoch), int(batch_idx))
        self._skip_now = False
        if not _any_rank(trainer, found is not None):
            return
        rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        what = _describe(*found) if found is not None else "another rank's batch has NaN/Inf values"
        where = f"{stage} batch {batch_idx} of epoch {trainer.current_epoch}{rank}"
        if self.skip and stage in _STEPS:
            if stage == "train" and trainer.world_size > 1:  # DDP: run the step on zeros, drop its update
                for _, t in _tensors(batch):
                    if t.is_floating_point():
                        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
                self._drop_update = True
            else:
                self._skip_now = True
            self.skipped.append(self._batch)
            log.warning("skipping %s: %s (skip_nonfinite_batches=true)", where, what)
            return
        hint = "" if stage == "predict" else "; set skip_nonfinite_batches=true to skip such batches instead"
        raise NonFiniteBatchError(f"non-finite input in {where}: {what}{hint}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_batch(trainer, batch, batch_idx, "train")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_batch(trainer, batch, batch_idx, "val")

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_batch(trainer, batch, batch_idx, "test")

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_batch(trainer, batch, batch_idx, "predict")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._skip_now = self._drop_update = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        # without gradients (None) the optimiser skips every parameter: no step, no state change
        if self._drop_update:  # a skipped batch under DDP (decided on all ranks at its start)
            optimizer.zero_grad(set_to_none=True)
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not (grads and self.check_gradients) or torch.stack([g.isfinite().all() for g in grads]).all():
            return  # gradients are identical on all ranks after the all-reduce: no collective
        _, epoch, idx = self._batch
        where = f"train batch {idx} of epoch {epoch}"
        if self.skip:
            optimizer.zero_grad(set_to_none=True)
            self.skipped.append(("train", epoch, idx))
            log.warning("skipping the update of %s: its gradients have NaN/Inf values "
                        "(skip_nonfinite_batches=true)", where)
            return
        raise NonFiniteBatchError(f"non-finite gradients after {where} (the loss or the model produced "
                                  f"NaN/Inf; inputs were finite); set skip_nonfinite_batches=true to skip "
                                  f"such updates")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = sum(1 for s, e, _ in self.skipped if s == "train" and e == trainer.current_epoch)
        if self.skip:  # the same count on every rank (the decisions are all-reduced)
            pl_module.log("train/skipped_batches", float(n), on_epoch=True, logger=True, sync_dist=True)
        if n:
            log.warning("epoch %d: skipped %d training batch(es) with NaN/Inf values",
                        trainer.current_epoch, n)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": [list(s) for s in self.skipped]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = [tuple(s) for s in state_dict.get("skipped", [])]  # type: ignore[misc]


def ensure_default_callbacks(callbacks: list[Callback], skip_nonfinite: bool = False) -> list[Callback]:
    """``callbacks`` plus a :class:`NonFiniteGuard` (mode ``skip_nonfinite``), a :class:`SyncEpochMetrics`
    and a :class:`RequeueCheckpoint` where it has none (in place; returned for convenience)."""
    for default in (NonFiniteGuard(skip=skip_nonfinite), SyncEpochMetrics(), RequeueCheckpoint()):
        if not any(isinstance(c, type(default)) for c in callbacks):
            callbacks.append(default)
    return callbacks


class RequeueExit(SystemExit):
    """Raised after :class:`RequeueCheckpoint` saved ``last.ckpt``: the process ends with status
    ``128 + signal number``, without the stage's artifacts and without a ``FAILED`` marker."""


def _as_signal(value: str | int | signal.Signals) -> signal.Signals:
    found: Any = value
    if isinstance(value, str):
        name = value.strip().upper()
        found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if isinstance(found, int) and not isinstance(found, bool):  # a signal.Signals is an int too
        return signal.Signals(found)
    raise ValueError(f"signal must be a signal name (USR2, SIGUSR2) or number, got {value!r}")


class RequeueCheckpoint(Callback):
    """Save the running stage's ``last.ckpt`` when the scheduler's warning signal arrives, then requeue.

    SLURM (through submitit, ``hydra/launcher=slurm``) sends ``SIGUSR2`` ``signal_delay_s`` before the
    time limit; submitit's handler would requeue at once, without a checkpoint. From ``on_train_start``
    to ``teardown`` this callback replaces it: the signal sets a flag, and after the current training
    batch (all DDP ranks together) it writes ``<ModelCheckpoint dirpath>/last.ckpt``, calls the replaced
    handler (else ``scontrol requeue`` when ``requeue`` is set in a SLURM job) and raises
    :class:`RequeueExit`. The requeued job resumes from that step. Outside SLURM, ``kill -USR2 <pid>``
    is a clean "checkpoint and stop". ``signal``: a name or number (``None`` disables the callback).

    Lightning's own SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the trainer's signal
    connector, pytorch_lightning 2.6) does not do this job, for five reasons:

    - under submitit it never saves: the connector installs its handler only on a requeue signal that has
      no handler yet, and submitit has installed one on ``SIGUSR2``; its default ``SIGUSR1`` is a signal
      submitit never has SLURM send;
    - it writes ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, in the run directory that every stage's Trainer
      shares, and inside SLURM resumes from the newest one whenever a ``fit`` gets no ``ckpt_path``, whichever
      stage it belongs to; a stage resumes from its own ``checkpoints/<stage>/last.ckpt`` only;
    - it saves inside the signal handler, wherever the training step is (between backward and the optimiser
      step, say), and under DDP each rank enters the checkpoint's collectives at a different point;
    - it does not stop: the fit goes on until SLURM ends the requeued job, wherever that lands;
    - it acts only inside a SLURM job step (it reads the ranks from SLURM's variables), so it cannot be a
      trainer setting of every run, and outside SLURM the signal does nothing.
    """

    def __init__(self, signal: str | int | None = "SIGUSR2", requeue: bool = True) -> None:
        self.signum = None if signal is None else _as_signal(signal)
        self.requeue = bool(requeue)
        self.received = False
        self.saved: Path | None = None
        self._previous: Any = None
        self._installed = False
        self._frame: Any = None

    def _restore(self) -> None:
        if not self._installed:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False
        self._previous = None  # no handler or frame kept: the callback stays picklable (ddp_spawn)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True
        self._frame = frame
        log.warning("received %s: saving last.ckpt after the current training step, then requeueing",
                    signal.Signals(signum).name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handler (not in setup: Lightning restores the handlers it saw after setup)."""
        main = threading.current_thread() is threading.main_thread()  # Python handles signals there only
        if self.signum is None or self._installed or not main:
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        self._installed = True
        self.received = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        previous, received = self._previous, self._installed and self.received
        self._restore()
        if received:  # arrived after the last training batch, too late for on_train_end: hand over now
            self._hand_over(previous, trainer.global_rank)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._installed and _any_rank(trainer, self.received):
            self._checkpoint_and_exit(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the signal came during the last validation: the stage must not go on to its artifacts
        if self._installed and _any_rank(trainer, self.received):
            self._checkpoint_and_exit(trainer)

    def _checkpoint_and_exit(self, trainer: pl.Trainer) -> None:
        """Save ``<dirpath>/last.ckpt`` of the trainer's first ModelCheckpoint with a directory, hand over."""
        cb = next((c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)), None)
        if cb is None:
            log.warning("%s: the trainer has no ModelCheckpoint with a directory; nothing saved",
                        signal.Signals(int(self.signum or 0)).name)
        else:
            path = Path(cb.dirpath) / (getattr(cb, "CHECKPOINT_NAME_LAST", "last")
                                       + getattr(cb, "FILE_EXTENSION", ".ckpt"))
            trainer.save_checkpoint(path)  # every rank takes part; global rank 0 writes
            self.saved = path
            log.warning("saved %s at epoch %d, step %d", path, trainer.current_epoch, trainer.global_step)
        previous = self._previous
        self._restore()
        self._hand_over(previous, trainer.global_rank)

    def _hand_over(self, previous: Any, global_rank: int) -> None:
        """Requeue through the replaced handler (or ``scontrol``), then end the process."""
        signum = int(self.signum or 0)
        self.received = False
        frame, self._frame = self._frame, None
        if callable(previous):  # submitit: requeue (rank 0) and exit; its other ranks return
            previous(signum, frame)
        elif self.requeue:
            _slurm_requeue(global_rank)
        raise RequeueExit(128 + signum)


def _slurm_requeue(global_rank: int) -> None:
    """``scontrol requeue <job>`` on global rank 0 of a SLURM job (a warning if it fails); else nothing."""
    job = os.environ.get("SLURM_JOB_ID")
    if global_rank != 0 or not job:
        return
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        job = f"{array_job}_{array_task}"
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeueing: unexpected SLURM job id %r", job)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except OSError as exc:
        log.warning("could not requeue SLURM job %s: %s", job, exc)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())


class SyncEpochMetrics(Callback):
    """Compute the epoch metrics on every rank first: under DDP the progress bar reads them on rank 0
    only, an all-reduce for ``sync_dist=True`` values the other ranks never join (Lightning #21264)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            trainer.progress_bar_metrics  # noqa: B018 - the access computes (and caches) on every rank


class RNGState(Callback):
    """Save the global RNG states (python, numpy, torch, CUDA) in checkpoints and restore them on resume,
    so a resumed run draws the same random numbers (stored ``weights_only=True``-loadable)."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": [int(version), [int(v) for v in internal], gauss],
            "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            if "python" in state_dict:
                version, internal, gauss = state_dict["python"]
                random.setstate((int(version), tuple(int(v) for v in internal), gauss))
            if "numpy" in state_dict:
                name, keys, pos, has_gauss, cached = state_dict["numpy"]
                np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                                     float(cached)))
            if "torch" in state_dict:
                torch.set_rng_state(state_dict["torch"])
            cuda = state_dict.get("cuda")
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        except (TypeError, ValueError, RuntimeError) as exc:
            log.warning("could not restore the RNG states from the checkpoint (%s); continuing with the "
                        "current ones", exc)


class ChannelsLast(Callback):
    """Convert the LightningModule's 4-D weights to ``torch.channels_last`` (cuDNN's fast NHWC path)
    before it runs; ``"auto"`` converts on CUDA only."""

    def __init__(self, enabled: bool | str = "auto") -> None:
        if enabled not in (True, False, "auto"):
            raise ValueError(f"enabled must be true, false or 'auto', got {enabled!r}")
        self.enabled = enabled

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled is True or (self.enabled == "auto" and trainer.strategy.root_device.type == "cuda"):
            pl_module.to(memory_format=torch.channels_last)
