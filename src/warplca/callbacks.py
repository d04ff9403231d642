"""Lightning callbacks for reliability and the GPU path: non-finite batch guard, RNG state, channels_last.

- :class:`NonFiniteGuard` — NaN/Inf in a batch (or in the gradients it produced) stops the run with an
  error naming the batch index, or, with ``skip=True`` (``skip_nonfinite_batches=true``), skips that
  batch's update with a warning. Never silent. Under DDP all ranks take the same decision.
- :class:`RNGState` — saves the python / numpy / torch (and CUDA) RNG states in every checkpoint and
  restores them on resume, so a resumed run continues the same random streams.
- :class:`ChannelsLast` — converts the LightningModule to ``torch.channels_last`` (NHWC) before fitting:
  the fast layout of cuDNN convolutions, on by default for CUDA only.
- :class:`SyncEpochMetrics` — works around a DDP deadlock in Lightning's progress bars (Lightning issue
  #21264): at the end of a training epoch the bar, on rank 0 only, computes the epoch values of metrics
  logged with ``sync_dist=True`` — a collective the other ranks never join. This callback computes them
  on every rank first, so the bar reads cached values.
- :class:`RequeueCheckpoint` — on ``SIGUSR2`` (what submitit, hence ``hydra/launcher=slurm``, has SLURM
  send ``signal_delay_s`` before the time limit) writes the running stage's ``last.ckpt`` after the
  current training step, then hands over to the requeue (submitit's handler, else ``scontrol requeue``)
  and exits, so the requeued job resumes from that step.

:func:`ensure_default_callbacks` adds a :class:`NonFiniteGuard`, a :class:`SyncEpochMetrics` and a
:class:`RequeueCheckpoint` to a callback list that lacks them (the run context does this for every
stage, so ``callbacks=none`` cannot switch them off).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
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


def first_nonfinite(batch: Any, path: str = "batch") -> tuple[str, Tensor] | None:
    """The first floating-point tensor in a (nested) batch with NaN/Inf values, with its position."""
    if isinstance(batch, Tensor):
        inexact = batch.is_floating_point() or batch.is_complex()
        return (path, batch) if inexact and not bool(torch.isfinite(batch).all()) else None
    if isinstance(batch, dict):
        items: Sequence[tuple[str, Any]] = [(f"{path}[{k!r}]", v) for k, v in batch.items()]
    elif isinstance(batch, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(batch)]
    else:
        return None
    for sub, value in items:
        found = first_nonfinite(value, sub)
        if found is not None:
            return found
    return None


def _describe(where: str, t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{where} (shape {tuple(t.shape)}, {t.dtype}) has {nan} NaN and {inf} Inf values"


class NonFiniteGuard(Callback):
    """Stop on (default) or skip (``skip=True``) batches with NaN/Inf inputs or gradients.

    Inputs are checked at the start of every train / validation / test / predict batch; gradients after
    the backward pass (post all-reduce under DDP, so every rank sees the same thing). A bad training
    batch raises :class:`NonFiniteBatchError` naming the stage, epoch and batch index; with ``skip``
    its update is skipped, a warning names it, and ``skipped`` records ``(stage, epoch, batch_idx)``.
    Predict batches (target caches) are never skipped. Under DDP the decision is all-reduced, so all
    ranks skip or stop together (one tiny collective per batch; none on one process).

    How a training batch is skipped: on one process its ``training_step`` is not run at all. Under DDP
    Lightning forbids skipping the step, so every rank runs it — the bad rank with its NaN/Inf entries
    replaced by 0 — and the gradients are dropped before the optimiser step, which then leaves the
    weights (and its own state) untouched; that batch's loss and training metrics still count.

    Args:
        skip: skip bad batches instead of stopping the run.
        check_gradients: also check the gradients before every optimiser step.
    """

    def __init__(self, skip: bool = False, check_gradients: bool = True) -> None:
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be True or False, got {skip!r}")
        self.skip = skip
        self.check_gradients = bool(check_gradients)
        self.skipped: list[tuple[str, int, int]] = []
        self._skip_now = False
        self._drop_update = False
        self._batch: tuple[str, int, int] = ("train", 0, 0)

    # -- wrapping the step methods so a skipped batch does not run at all -----------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.skip:
            return
        for name in _STEPS.values():
            current = getattr(pl_module, name, None)
            if current is None or getattr(current, _MARK, False):
                continue
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

    # -- inputs ---------------------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer, bad: bool) -> bool:
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def _check_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int, stage: str) -> None:
        found = first_nonfinite(batch)
        self._batch = (stage, int(trainer.current_epoch), int(batch_idx))
        bad = self._decide(trainer, found is not None)
        self._skip_now = False
        if not bad:
            return
        rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        what = _describe(*found) if found is not None else "another rank's batch has NaN/Inf values"
        where = f"{stage} batch {batch_idx} of epoch {trainer.current_epoch}{rank}"
        if self.skip and stage in _STEPS:
            if stage == "train" and trainer.world_size > 1:  # DDP: run the step, drop its update
                _zero_nonfinite(batch)
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
        self._skip_now = False
        self._drop_update = False

    # -- gradients ------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._drop_update:  # a skipped batch under DDP (decided on all ranks at its start)
            _drop_gradients(optimizer)
            return
        if not self.check_gradients:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(finite):  # gradients are identical on all ranks after the all-reduce: no collective
            return
        stage, epoch, idx = self._batch
        where = f"train batch {idx} of epoch {epoch}"
        if self.skip:
            _drop_gradients(optimizer)
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


def _zero_nonfinite(batch: Any) -> None:
    """Replace NaN/Inf entries of every floating-point tensor in a (nested) batch by 0, in place."""
    if isinstance(batch, Tensor):
        if batch.is_floating_point():
            torch.nan_to_num_(batch, nan=0.0, posinf=0.0, neginf=0.0)
    elif isinstance(batch, dict):
        for v in batch.values():
            _zero_nonfinite(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _zero_nonfinite(v)


def _drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient to None: optimisers skip parameters without one (no step, no state change)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def ensure_default_callbacks(callbacks: list[Callback], skip_nonfinite: bool = False) -> list[Callback]:
    """``callbacks`` plus a :class:`NonFiniteGuard` (mode ``skip_nonfinite``), a :class:`SyncEpochMetrics`
    and a :class:`RequeueCheckpoint` where it has none (in place; returned for convenience)."""
    if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
        callbacks.append(NonFiniteGuard(skip=skip_nonfinite))
    if not any(isinstance(c, SyncEpochMetrics) for c in callbacks):
        callbacks.append(SyncEpochMetrics())
    if not any(isinstance(c, RequeueCheckpoint) for c in callbacks):
        callbacks.append(RequeueCheckpoint())
    return callbacks


class RequeueExit(SystemExit):
    """Raised after :class:`RequeueCheckpoint` saved ``last.ckpt`` on its signal: the process ends (exit
    status ``128 + signal number``, the shell's convention for "stopped by that signal") without writing
    the stage's artifacts, and without a ``FAILED`` marker — the job was interrupted, not broken."""


def _as_signal(value: str | int | signal.Signals) -> signal.Signals:
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return signal.Signals(value)
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if hasattr(signal, name):
            return signal.Signals(getattr(signal, name))
    raise ValueError(f"signal must be a signal name (USR2, SIGUSR2) or number, got {value!r}")


class RequeueCheckpoint(Callback):
    """Save the running stage's ``last.ckpt`` when the scheduler's warning signal arrives, then requeue.

    ``hydra/launcher=slurm`` (submitit) submits every job with ``--signal=USR2@<signal_delay_s>``: SLURM
    sends ``SIGUSR2`` that long before the time limit (and on preemption), and submitit's own handler
    requeues the job and exits at once — without a checkpoint of the step the run is at. While a
    ``Trainer.fit`` runs, this callback replaces that handler: the signal only sets a flag; at the end of
    the current training batch (all DDP ranks decide together: one tiny all-reduce per batch) it writes
    ``<ModelCheckpoint dirpath>/last.ckpt`` — ``checkpoints/<stage>/…``, what the stage resumes from —
    then calls the handler it replaced (submitit: ``scontrol requeue`` and exit on rank 0). Without such a
    handler it runs ``scontrol requeue $SLURM_JOB_ID`` itself when ``requeue`` is set and the process
    runs in a SLURM job. Either way the process then ends with :class:`RequeueExit`, so no stage goes on
    to write artifacts of a half-trained model; the requeued job (the same command in the same job
    directory) skips finished stages and resumes this one from the saved step. Outside SLURM, ``kill
    -USR2 <pid>`` is a clean "checkpoint and stop": rerun the command to continue.

    The handler is in place from the start to the end of the training loop (``on_train_start`` →
    ``teardown``). Outside it (set-up, evaluation, target caches, study stages) the previous handler
    acts: submitit requeues at once, and the stage restarts from its last checkpoint or its own
    resumable state.

    Args:
        signal: the signal to act on (name or number); ``None`` disables the callback.
        requeue: without a previous Python handler, run ``scontrol requeue`` on global rank 0 of a SLURM
            job (``SLURM_JOB_ID`` set).
    """

    def __init__(self, signal: str | int | None = "SIGUSR2", requeue: bool = True) -> None:
        self.signum = None if signal is None else _as_signal(signal)
        self.requeue = bool(requeue)
        self.received = False
        self.saved: Path | None = None
        self._previous: Any = None
        self._installed = False
        self._frame: Any = None

    # -- the handler ----------------------------------------------------------------------------
    def _install(self) -> None:
        main = threading.current_thread() is threading.main_thread()  # Python handles signals there only
        if self.signum is None or self._installed or not main:
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        self._installed = True
        self.received = False

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

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not in ``setup``: Lightning records every signal handler after ``setup`` and puts them back
        # when the fit ends (also on an exception), which would leave this one installed
        self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        previous, received = self._previous, self._installed and self.received
        self._restore()
        if received:  # arrived after the last training batch, too late for on_train_end: hand over now
            self._hand_over(previous, trainer.global_rank)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore()

    def _decided(self, trainer: pl.Trainer) -> bool:
        stop = self.received
        if trainer.world_size > 1:  # ranks get the signal at slightly different times: decide together
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        return stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._installed and self._decided(trainer):
            self._checkpoint_and_exit(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # during the last validation: training is complete, but the stage must not go on to its artifacts
        if self._installed and self._decided(trainer):
            self._checkpoint_and_exit(trainer)

    # -- checkpoint, requeue, exit --------------------------------------------------------------
    def checkpoint_path(self, trainer: pl.Trainer) -> Path | None:
        """``<dirpath>/last.ckpt`` of the trainer's first ModelCheckpoint with a directory (None if none)."""
        for cb in trainer.checkpoint_callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if dirpath:
                name = getattr(cb, "CHECKPOINT_NAME_LAST", "last") + getattr(cb, "FILE_EXTENSION", ".ckpt")
                return Path(dirpath) / name
        return None

    def _checkpoint_and_exit(self, trainer: pl.Trainer) -> None:
        signum = int(self.signum) if self.signum is not None else 0
        path = self.checkpoint_path(trainer)
        if path is None:
            log.warning("%s: the trainer has no ModelCheckpoint with a directory; nothing saved",
                        signal.Signals(signum).name)
        else:
            trainer.save_checkpoint(path)  # every rank takes part; global rank 0 writes
            self.saved = path
            log.warning("saved %s at epoch %d, step %d", path, trainer.current_epoch, trainer.global_step)
        previous = self._previous
        self._restore()
        self._hand_over(previous, trainer.global_rank)

    def _hand_over(self, previous: Any, global_rank: int) -> None:
        """Requeue through the replaced handler (or ``scontrol``), then end the process."""
        signum = int(self.signum) if self.signum is not None else 0
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
    """Compute the epoch-level logged metrics on every rank before the progress bar reads them on rank 0.

    Under DDP, Lightning's progress bars (TQDM and Rich) fetch ``trainer.progress_bar_metrics`` in
    ``on_train_epoch_end`` on rank 0 only; for values logged with ``sync_dist=True`` that starts an
    all-reduce the other ranks never join, and the run hangs (Lightning issue #21264). Callbacks run
    before the bar, so computing the same values here on all ranks fills the cache the bar then reads.
    A no-op on one process.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            trainer.progress_bar_metrics  # noqa: B018 - the access computes (and caches) on every rank


class RNGState(Callback):
    """Save the global RNG states (python, numpy, torch, CUDA) in checkpoints; restore them on resume.

    Lightning does not checkpoint them, so without this a resumed run draws different random numbers
    (augmentation, dropout, re-drawn dead atoms) than the uninterrupted run would have. The states are
    stored as tensors and plain lists, so checkpoints stay loadable with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "python": _plain_python_state(random.getstate()),
            "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
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


def _plain_python_state(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


class ChannelsLast(Callback):
    """Convert the LightningModule's 4-D weights to ``torch.channels_last`` before it runs.

    Convolutions pick the NHWC path when their weight is channels_last, so inputs need no conversion.
    ``enabled="auto"`` (default) converts on CUDA devices only (on CPU, NCHW is as fast or faster).
    """

    def __init__(self, enabled: bool | str = "auto") -> None:
        if enabled not in (True, False, "auto"):
            raise ValueError(f"enabled must be true, false or 'auto', got {enabled!r}")
        self.enabled = enabled

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        on = self.enabled is True or (self.enabled == "auto" and trainer.strategy.root_device.type == "cuda")
        if on:
            pl_module.to(memory_format=torch.channels_last)
