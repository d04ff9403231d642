"""SLURM requeue: the launcher's warning signal (SIGUSR2, what submitit has SLURM send) during a real fit
writes the running stage's last.ckpt, hands over to the requeue and ends the process; the requeued job
(the same command) resumes from that step. Lightning's own SLURM auto-requeue does not do this (shown
here), and a job process that only unpickles the task has what Hydra needs to compose its config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from warplca.callbacks import RequeueCheckpoint, RequeueExit, ensure_default_callbacks
from warplca.config import default_config_dir

REPO = Path(__file__).resolve().parents[1]
SIGUSR2 = signal.SIGUSR2


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)),
                      batch_size=4)  # 8 steps per epoch


class SendSignalAt(pl.Callback):
    """Sends ``signum`` to this very process at the end of training step ``step`` (like SLURM would)."""

    def __init__(self, step: int, signum: int = SIGUSR2) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _trainer(tmp_path: Path, *callbacks: pl.Callback, max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    # ModelCheckpoint writes last.ckpt at epoch ends only: a mid-epoch last.ckpt comes from the signal
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[*callbacks, ckpt], **kwargs)


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture
def submitit_like_handler():
    """A stand-in for submitit's SIGUSR2 handler (requeue on rank 0, then exit): records its calls."""
    calls: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        calls.append(signum)
        sys.exit(-1)  # what submitit does after `scontrol requeue`

    before = signal.signal(SIGUSR2, handler)
    yield calls, handler
    signal.signal(SIGUSR2, before)


def test_signal_mid_epoch_saves_last_ckpt_then_hands_over_and_the_rerun_resumes(
        tmp_path: Path, submitit_like_handler) -> None:
    calls, handler = submitit_like_handler
    requeue = RequeueCheckpoint()
    with pytest.raises(SystemExit) as exc:
        _trainer(tmp_path, SendSignalAt(3), requeue).fit(_Regression(), _loader())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert requeue.saved == last and last.is_file()
    assert _step(last) == 3  # the step the signal arrived at, mid-epoch 0 (8 steps per epoch)
    assert calls == [SIGUSR2] and exc.value.code == -1  # submitit's handler requeued and exited
    assert signal.getsignal(SIGUSR2) is handler  # restored after the fit
    # the requeued job: the same fit from last.ckpt ends where an uninterrupted one does
    resumed = _trainer(tmp_path, RequeueCheckpoint())
    resumed.fit(_Regression(), _loader(), ckpt_path=str(last))
    assert resumed.global_step == 16 and calls == [SIGUSR2]


def test_without_a_previous_handler_it_checkpoints_and_exits_with_128_plus_the_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # outside SLURM: `kill -USR2` = checkpoint and stop
    before = signal.signal(SIGUSR2, signal.SIG_DFL)
    try:
        with pytest.raises(RequeueExit) as exc:
            _trainer(tmp_path, SendSignalAt(5), RequeueCheckpoint()).fit(_Regression(), _loader())
        assert exc.value.code == 128 + SIGUSR2
        assert _step(tmp_path / "checkpoints" / "last.ckpt") == 5
        assert signal.getsignal(SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(SIGUSR2, before)


def test_no_signal_no_effect_and_the_handler_is_only_armed_during_fit(tmp_path: Path) -> None:
    seen: list[Any] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(signal.getsignal(SIGUSR2))

    requeue = RequeueCheckpoint()
    before = signal.getsignal(SIGUSR2)
    trainer = _trainer(tmp_path, Probe(), requeue, max_epochs=1)
    trainer.fit(_Regression(), _loader())
    assert trainer.global_step == 8 and requeue.saved is None
    assert seen and all(h == requeue._on_signal for h in seen)
    assert signal.getsignal(SIGUSR2) == before
    with pytest.raises(ValueError, match="signal"):
        RequeueCheckpoint(signal="NOT_A_SIGNAL")
    assert RequeueCheckpoint(signal="USR2").signum == RequeueCheckpoint(signal=int(SIGUSR2)).signum == SIGUSR2
    assert any(isinstance(c, RequeueCheckpoint) for c in ensure_default_callbacks([]))


@pytest.fixture
def in_a_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment of a one-task SLURM job step (what Lightning's SLURMEnvironment reads), with a
    stand-in ``scontrol`` on PATH that appends its arguments to the returned file instead of requeueing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    return record


class RequireHandler(pl.Callback):
    """Fails the fit if nothing handles SIGUSR2 (its default action would end the test process)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert signal.getsignal(SIGUSR2) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def test_lightning_slurm_auto_requeue_does_not_do_what_requeue_checkpoint_does(
        tmp_path: Path, in_a_slurm_job: Path, submitit_like_handler) -> None:
    """Why RequeueCheckpoint exists: Lightning's SLURMEnvironment(auto_requeue=True) on SIGUSR2 saves
    nothing when submitit's handler is installed (as it is in every hydra/launcher=slurm job); without one
    it saves hpc_ckpt_<n>.ckpt into default_root_dir (the run directory every stage shares), not the
    stage's checkpoints/<stage>/last.ckpt, and the fit goes on."""
    calls, _ = submitit_like_handler

    def slurm() -> SLURMEnvironment:
        return SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR2)

    under_submitit = tmp_path / "submitit"
    with pytest.raises(SystemExit):  # submitit's handler requeued and exited; Lightning saved nothing
        _trainer(under_submitit, SendSignalAt(3), plugins=[slurm()]).fit(_Regression(), _loader())
    assert calls == [SIGUSR2]
    assert not list(under_submitit.rglob("*.ckpt")) and not in_a_slurm_job.exists()

    signal.signal(SIGUSR2, signal.SIG_DFL)  # no handler before the fit (the fixture restores the original)
    alone = tmp_path / "alone"
    trainer = _trainer(alone, RequireHandler(), SendSignalAt(3), plugins=[slurm()])
    trainer.fit(_Regression(), _loader())
    assert calls == [SIGUSR2]
    assert _step(alone / "hpc_ckpt_1.ckpt") == 3  # in the Trainer's root directory
    assert in_a_slurm_job.read_text().split() == ["requeue", "4242"]
    assert trainer.global_step == 16  # it did not stop: the fit ran to its end after requeueing
    assert _step(alone / "checkpoints" / "last.ckpt") == 16  # the stage's own last.ckpt: epoch ends only


def test_a_job_process_that_unpickles_the_task_registers_the_resolvers(tmp_path: Path) -> None:
    """hydra/launcher=slurm pickles the task function (with cloudpickle, as submitit does) and the job
    process, also after every requeue, is a fresh interpreter that unpickles it and then composes its
    config and names its log file with ``${warplca.rank_suffix:}``: unpickling must register it."""
    cloudpickle = pytest.importorskip("cloudpickle")
    from warplca.cli import eval_main, train_main

    check = textwrap.dedent("""
        import pickle, sys
        from pathlib import Path
        from omegaconf import OmegaConf
        pickle.loads(Path(sys.argv[1]).read_bytes())
        print(OmegaConf.has_resolver("warplca.rank_suffix"))
    """)
    for main in (train_main, eval_main):
        pickled = tmp_path / f"{main.__name__}.pkl"
        pickled.write_bytes(cloudpickle.dumps(main.__wrapped__))  # the task hydra.main hands to the launcher
        proc = subprocess.run([sys.executable, "-c", check, str(pickled)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == "True", main.__name__


class SendSignalOnRank(SendSignalAt):
    """Signals only the process of global rank ``rank`` (SLURM's signals reach ranks at different times)."""

    def __init__(self, step: int, rank: int) -> None:
        super().__init__(step)
        self.rank = rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank:
            super().on_train_batch_end(trainer, *args)


def test_under_ddp_all_ranks_stop_together_when_one_gets_the_signal(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGUSR2: the decision is all-reduced, both ranks save (rank 0 writes) and exit
    at the same step instead of one waiting forever in the next collective."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    callbacks = [SendSignalOnRank(2, rank=1), RequeueCheckpoint(), ckpt]
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=callbacks)
    start = time.time()
    with pytest.raises(Exception, match=str(128 + SIGUSR2)):  # the spawned ranks exit with status 140
        trainer.fit(_Regression(), _loader())
    assert time.time() - start < 120
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 2  # 4 steps per epoch on each of 2 ranks


def test_the_launcher_config_and_the_callback_agree_on_sigusr2() -> None:
    conf = default_config_dir()
    callbacks = yaml.safe_load((conf / "callbacks" / "default.yaml").read_text())
    entry = callbacks["requeue_checkpoint"]
    assert entry["_target_"] == "warplca.callbacks.RequeueCheckpoint"
    assert RequeueCheckpoint(signal=entry["signal"]).signum == SIGUSR2
    launcher = (conf / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "SIGUSR2" in launcher and "SIGUSR1" not in launcher


#: dictionary learning, one epoch of 8 steps; ModelCheckpoint writes last.ckpt only at the epoch end
_RUN = ("stages=[dictionary]", "dictionary=tiny", "data.n_train=64", "data.n_val=16", "data.n_test=16",
        "data.batch_size=8", "model.dictionary.iters=20", "model.dictionary.test_iters=20",
        "model.dictionary.trainer.max_epochs=1", "lca.iters=20", "logger=csv")

#: slows every training step down and records the step reached, so the test can signal mid-epoch
_SLOW_MODULE = textwrap.dedent('''
    import time
    from pathlib import Path
    import pytorch_lightning as pl

    class Slow(pl.Callback):
        def __init__(self, marker):
            self.marker = Path(marker)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.marker.write_text(str(trainer.global_step))
            time.sleep(0.5)
''')


@pytest.mark.slow  # two train.py processes (about a minute on a busy 2-core machine); run with -m slow
def test_sigusr2_to_a_real_training_process_writes_last_ckpt_and_the_rerun_resumes(tmp_path: Path) -> None:
    (tmp_path / "slowdown.py").write_text(_SLOW_MODULE)
    marker, run = tmp_path / "step.txt", tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("SLURM_JOB_ID", None)
    cmd = [sys.executable, str(REPO / "train.py"), *_RUN, "+callbacks.slow._target_=slowdown.Slow",
           f"+callbacks.slow.marker={marker}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    sent_at = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            step = int(marker.read_text() or 0) if marker.is_file() else 0
            if step >= 2:
                os.kill(proc.pid, SIGUSR2)
                sent_at = step
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent_at is not None, f"training never reached step 2:\n{err[-3000:]}"
    assert proc.returncode == 128 + SIGUSR2, err[-3000:]
    last = run / "checkpoints" / "dictionary" / "last.ckpt"
    assert last.is_file(), err[-3000:]
    assert sent_at <= _step(last) < 8  # mid-epoch: written on the signal, not by the epoch-end save
    assert not (run / "dictionary.pt").exists() and not (run / "FAILED").exists()
    assert "received SIGUSR2" in (run / "train.log").read_text()
    # the requeued job runs the same command: it resumes the stage from that step and finishes it
    again = subprocess.run(cmd[:-3] + [f"hydra.run.dir={run}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (run / "dictionary.pt").is_file()
    assert "resuming the dictionary stage from" in (run / "train.log").read_text()
