"""Faults: a SIGKILLed training run resumes mid-epoch to the same result; truncated or foreign artifacts are
refused naming the file; NaN/Inf batches stop the run naming the batch (or are skipped, never silently)."""

from __future__ import annotations

import json
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
from torch.utils.data import DataLoader, TensorDataset

from warplca import LCA, ConvDictionary
from warplca.callbacks import NonFiniteBatchError, NonFiniteGuard, RNGState
from warplca.data import Normalization
from warplca.modules.dictionary_learning import DictionaryLearning

REPO = Path(__file__).resolve().parents[1]

#: dictionary learning, one epoch of 8 steps, with a last.ckpt after every step
RESUMABLE = ("stages=[dictionary]", "dictionary=tiny", "data.n_train=64", "data.n_val=16", "data.n_test=16",
             "data.batch_size=8", "model.dictionary.iters=20", "model.dictionary.lr=0.01",
             "model.dictionary.test_iters=20", "model.dictionary.trainer.max_epochs=1", "lca.iters=20",
             "callbacks.model_checkpoint.every_n_train_steps=1", "logger=csv")

#: a callback that makes every training step slow enough to be killed in the middle of an epoch
_SLOW_MODULE = textwrap.dedent('''
    import time
    import pytorch_lightning as pl

    class Slow(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.3)
''')


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "1",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore"}


def _global_step(ckpt: Path) -> int | None:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # not there yet / being replaced
        return None


def _comparable(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("time_s") and isinstance(v, (int, float))}


class CrashAtStep(pl.Callback):
    """Raises at the end of training step ``step`` (before that step's checkpoint is written)."""

    def __init__(self, step: int = 4) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_crash_mid_epoch_then_rerun_resumes_to_the_uninterrupted_result(
        make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In process (the SIGKILL variant below uses a real process): a crash after step 4 of 8, then the
    same config again: resumes from step 3's last.ckpt mid-epoch and ends where an uninterrupted run ends."""
    from warplca.runtime import FAILED
    from warplca.tasks.train import train

    reference = train(make_cfg(*RESUMABLE, tiny=False, output_dir=tmp_path / "reference"))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        train(make_cfg(*RESUMABLE, "+callbacks.crash._target_=test_faults.CrashAtStep", tiny=False,
                       output_dir=run))
    assert (run / FAILED).is_file() and not (run / "dictionary.pt").exists()
    assert _global_step(run / "checkpoints" / "dictionary" / "last.ckpt") == 3
    caplog.set_level("INFO")
    resumed = train(make_cfg(*RESUMABLE, tiny=False, output_dir=run))
    assert "resuming the dictionary stage from" in caplog.text
    assert "training loader: resuming epoch 0 after 3 of 8 batches" in caplog.text
    assert not (run / FAILED).exists()  # cleared when the run started again
    assert resumed["dictionary/global_step"] == reference["dictionary/global_step"] == 8
    for key, value in reference.items():
        if key.startswith("dictionary/") and not key.endswith("time_s"):
            assert resumed[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    ref_w = ConvDictionary.load(tmp_path / "reference" / "dictionary.pt").weight
    assert torch.allclose(ConvDictionary.load(run / "dictionary.pt").weight, ref_w, atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_resumes_to_the_uninterrupted_result(make_cfg, tmp_path: Path) -> None:
    from warplca.tasks.train import train

    # the uninterrupted reference, in process
    reference = train(make_cfg(*RESUMABLE, tiny=False, output_dir=tmp_path / "reference"))
    ref_weight = ConvDictionary.load(tmp_path / "reference" / "dictionary.pt").weight

    # the same run in a real process, SIGKILLed in the middle of its first epoch
    (tmp_path / "slowdown.py").write_text(_SLOW_MODULE)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *RESUMABLE, "+callbacks.slow._target_=slowdown.Slow",
           f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoints" / "dictionary" / "last.ckpt"
    deadline, killed_at = time.time() + 300, None
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before it was killed:\n{proc.stderr.read()[-3000:]}")
            step = _global_step(ckpt) if ckpt.is_file() else None
            if step is not None and 3 <= step <= 5:  # 8 steps per epoch: mid-epoch
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, "no mid-epoch checkpoint appeared"
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "dictionary.pt").exists() and not (run / "metrics.json").exists()

    # the same command again: resumes from last.ckpt, says so, and ends where the reference ended
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    log_text = (run / "train.log").read_text()
    assert "resuming the dictionary stage from" in log_text and str(ckpt) in log_text
    assert "training loader: resuming epoch 0 after" in log_text
    resumed = json.loads((run / "metrics.json").read_text())["dictionary"]
    expected = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith("dictionary/")}
    assert resumed["global_step"] == expected["global_step"] == 8
    for key, value in _comparable(expected).items():
        assert resumed[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert torch.allclose(ConvDictionary.load(run / "dictionary.pt").weight, ref_weight, atol=1e-5)


# -------------------------------------------------------------------------------------------------
# truncated or foreign files are refused, naming the file
# -------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_or_foreign_dictionary_and_bundle(tmp_path: Path) -> None:
    from warplca import WarpCNN, WarpLCA

    d = ConvDictionary(8, 3, 5, 2, seed=0)
    d.save(tmp_path / "d.pt")
    WarpLCA(d, WarpCNN(3, 8, 2, width=8, depth=2), LCA(d, lam=0.3, tau="auto")).save(tmp_path / "b.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name in ("d.pt", "b.pt"):
        _truncate(tmp_path / name)
    with pytest.raises(ValueError, match=r"d\.pt: cannot be read .*truncated or corrupt"):
        ConvDictionary.load(tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"b\.pt: cannot be read .*truncated or corrupt"):
        WarpLCA.load(tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt: is not a warplca.dictionary"):
        ConvDictionary.load(tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt: is not a warplca.bundle"):
        WarpLCA.load(tmp_path / "foreign.pt")


def test_truncated_or_foreign_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    from warplca.runtime import check_checkpoint

    d = ConvDictionary(4, 3, 5, 2, seed=0)
    module = DictionaryLearning(d, {"lam": 0.3, "tau": "auto"}, Normalization.identity(3), iters=3,
                                log_images_every_n_epochs=0)
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    good = tmp_path / "last.ckpt"
    trainer.save_checkpoint(good)
    assert check_checkpoint(good) == good
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: not a readable checkpoint .*truncated"):
        check_checkpoint(truncated)
    d.save(tmp_path / "dictionary.ckpt")
    with pytest.raises(ValueError, match=r"dictionary\.ckpt: not a Lightning checkpoint"):
        check_checkpoint(tmp_path / "dictionary.ckpt")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt: .*empty"):
        check_checkpoint(empty)


def test_corrupt_target_cache_is_refused_naming_the_file(tmp_path: Path) -> None:
    from warplca.data.target_cache import TargetCache
    from warplca.modules.target_builder import build_target_cache

    images = TensorDataset(torch.rand(6, 3, 8, 8), torch.zeros(6))
    d = ConvDictionary(4, 3, 5, 2, seed=0)
    cache = build_target_cache(tmp_path / "t", images, d, LCA(d, lam=0.2, tau="auto"), 3, chunk_size=3,
                               dataset_name="toy")
    states = cache.states_path
    _truncate(states)
    with pytest.raises(ValueError, match=r"states\.npy"):
        TargetCache.open(tmp_path / "t")
    (tmp_path / "t" / "manifest.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"manifest\.json: unreadable"):
        TargetCache.open(tmp_path / "t")


# -------------------------------------------------------------------------------------------------
# NaN / Inf batches
# -------------------------------------------------------------------------------------------------


def _module() -> DictionaryLearning:
    d = ConvDictionary(4, 3, 5, 2, seed=0)
    return DictionaryLearning(d, {"lam": 0.2, "tau": "auto"}, Normalization(mean=(0.5, 0.5, 0.5)), lr=0.01,
                              optimizer="adam", lr_schedule="constant", resample_every=0, iters=5,
                              log_images_every_n_epochs=0)


def _loader(bad_index: int | None, value: float = float("nan")) -> DataLoader:
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    if bad_index is not None:
        images[bad_index, 1, 2, 3] = value
    return DataLoader(TensorDataset(images, torch.zeros(16)), batch_size=4)


def _trainer(*callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_batch_stops_the_run_naming_the_batch(value: float) -> None:
    module = _module()
    trainer = _trainer(NonFiniteGuard())
    with pytest.raises(NonFiniteBatchError, match=r"train batch 2 of epoch 0: batch\[0\] .* (1 NaN|1 Inf)"):
        trainer.fit(module, _loader(bad_index=9, value=value))
    assert trainer.global_step == 2  # the two good batches trained, nothing after


def test_skip_nonfinite_batches_skips_exactly_that_update(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(skip=True)
    module = _module()
    before = module.dictionary.weight.detach().clone()
    caplog.set_level("WARNING")
    _trainer(guard).fit(module, _loader(bad_index=9))
    assert guard.skipped == [("train", 0, 2)]
    assert "skipping train batch 2 of epoch 0" in caplog.text
    # the same run without the bad batch's data changes the weights identically
    clean = _module()
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    keep = torch.cat([images[:8], images[12:]])
    _trainer().fit(clean, DataLoader(TensorDataset(keep, torch.zeros(12)), batch_size=4))
    assert not torch.equal(module.dictionary.weight, before)
    assert torch.allclose(module.dictionary.weight, clean.dictionary.weight, atol=1e-6)


def test_nonfinite_gradients_are_caught_too() -> None:
    class Diverging(DictionaryLearning):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    module = Diverging(ConvDictionary(4, 3, 5, 2, seed=0), {"lam": 0.2, "tau": "auto"},
                       Normalization(mean=(0.5, 0.5, 0.5)), iters=5, log_images_every_n_epochs=0)
    with pytest.raises(NonFiniteBatchError, match="non-finite gradients after train batch 1 of epoch 0"):
        _trainer(NonFiniteGuard()).fit(module, _loader(bad_index=None))


def test_nonfinite_validation_and_predict_batches_are_named() -> None:
    module = _module()
    with pytest.raises(NonFiniteBatchError, match="val batch 1 of epoch 0"):
        _trainer(NonFiniteGuard()).validate(module, _loader(bad_index=5))


def test_skip_setting_reaches_the_guard_from_the_config(make_cfg) -> None:
    from warplca.tasks.utils import instantiate_callbacks

    for flag in ("false", "true"):
        cfg = make_cfg(f"skip_nonfinite_batches={flag}")
        guards = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, NonFiniteGuard)]
        assert len(guards) == 1 and guards[0].skip is (flag == "true")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    cb = RNGState()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = cb.state_dict()
    torch.save({"cb": state}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    cb.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["cb"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.slow
def test_nonfinite_skip_is_taken_by_all_ranks_under_ddp() -> None:
    """Rank 1 gets the NaN batch; both ranks skip that step (else DDP would hang or diverge)."""
    guard = NonFiniteGuard(skip=True)
    module = _module()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[guard])
    trainer.fit(module, _loader(bad_index=13))  # whichever rank gets item 13: both skip that step
    metrics = trainer.callback_metrics  # what the spawned rank 0 sends back
    assert float(metrics["train/skipped_batches"]) == 1.0 and torch.isfinite(metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
