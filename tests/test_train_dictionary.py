"""The dictionary stage end to end: learning, artifacts, resume, loggers, the CLI and skip-on-rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from warplca.lca import ConvDictionary
from warplca.serialization import load_checked
from warplca.tasks.context import RunContext
from warplca.tasks.stage_dictionary import build_dictionary, evaluate_dictionary
from warplca.tasks.train import train

REPO = Path(__file__).resolve().parents[1]

#: a short real run: enough steps for the atoms to move measurably (~10 s on 2 cores)
LEARN = ("data.n_train=256", "data.batch_size=32", "model.dictionary.iters=20",
         "model.dictionary.test_iters=30", "model.dictionary.lr=0.5",
         "model.dictionary.trainer.max_epochs=2")


def _unit_norm(weight: torch.Tensor) -> bool:
    return torch.allclose(weight.flatten(1).norm(dim=1), torch.ones(weight.shape[0]), atol=1e-5)


def test_fast_dev_run(make_cfg) -> None:
    cfg = make_cfg("debug=fast_dev_run")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "dictionary.pt").is_file()
    assert "dictionary/test/psnr" in metrics and "dictionary/random/test/psnr" in metrics
    assert not (run / "csv").exists()  # debug: no loggers


def test_learning_beats_the_initial_dictionary(make_cfg) -> None:
    cfg = make_cfg(*LEARN)
    ctx = RunContext.from_config(cfg)
    initial = build_dictionary(ctx)  # the same seed as the stage's initial atoms
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    payload = load_checked(run / "dictionary.pt", "warplca.dictionary")
    learned = ConvDictionary.from_payload(payload)
    assert _unit_norm(learned.weight)
    assert not torch.allclose(learned.weight, initial.weight)
    meta = payload["meta"]
    assert set(meta) >= {"normalization", "data", "lca", "train", "metrics"}
    assert meta["lca"]["lam"] == cfg.lca.lam

    dm = ctx.datamodule
    norm = dm.normalization
    settings = ctx.lca_settings()
    iters = int(cfg.model.dictionary.test_iters)
    before = evaluate_dictionary(initial, settings, norm, dm.test_dataloader(), iters)
    after = evaluate_dictionary(learned, settings, norm, dm.test_dataloader(), iters)
    assert after["energy"] < before["energy"]
    assert after["psnr"] > before["psnr"] + 0.5
    # the stage's own test metrics are the same measurement
    assert metrics["dictionary/test/psnr"] == pytest.approx(after["psnr"], abs=0.05)
    assert metrics["dictionary/test/energy"] == pytest.approx(after["energy"], rel=1e-3)

    written = json.loads((run / "metrics.json").read_text())["dictionary"]
    assert written["test/psnr"] == pytest.approx(metrics["dictionary/test/psnr"])
    assert (run / "checkpoints" / "dictionary" / "last.ckpt").is_file()
    assert (run / "csv" / "dictionary" / "metrics.csv").is_file()
    assert (run / "atoms.png").is_file() and (run / "reconstructions.png").is_file()


def test_module_keeps_atoms_unit_norm_every_step() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from warplca.data import Normalization
    from warplca.modules.dictionary_learning import DictionaryLearning

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            assert _unit_norm(module.dictionary.weight.detach())

    images = torch.rand(16, 3, 16, 16)
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.int64)), batch_size=8)
    d = ConvDictionary(6, 3, 5, 2, seed=0)
    module = DictionaryLearning(d, {"threshold": "hard", "lam": 0.1, "tau": "auto"},
                                Normalization.fit(images), lr=0.05, optimizer="sgd", iters=5)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Check()])
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4
    assert "val/psnr" in trainer.callback_metrics and "train/l0_per_image" in trainer.callback_metrics


def test_coherence_penalty_lowers_the_operator_norm() -> None:
    """The same data, seed and steps with and without the penalty: the penalised atoms have a smaller
    ‖Φ‖²_op (a larger stable LCA step) and still unit norm."""
    import pytorch_lightning as pl

    from warplca.data import NaturalDataModule
    from warplca.modules.dictionary_learning import DictionaryLearning

    dm = NaturalDataModule(n_train=64, n_val=16, n_test=16, batch_size=16)
    norms = {}
    for weight in (0.0, 0.5):
        d = ConvDictionary(12, 3, 7, 2, seed=0)
        module = DictionaryLearning(d, {"threshold": "hard", "lam": 0.3, "tau": "auto"}, dm.normalization,
                                    lr=0.01, iters=10, coherence_weight=weight)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        assert _unit_norm(d.weight.detach())
        norms[weight] = d.operator_norm(32, 32)
    assert norms[0.5] < 0.8 * norms[0.0], norms


def test_resampling_replaces_a_dead_atom_with_a_unit_norm_residual_patch() -> None:
    from warplca.lca import atom_usage, dead_atoms, resample_atoms, used_atoms

    d = ConvDictionary(4, 1, 5, 1, seed=0)
    before = d.weight.detach().clone()
    residual = torch.zeros(2, 1, 16, 16)
    residual[1, 0, 3:8, 6:11] = torch.arange(25.0).view(5, 5)  # the one place the dictionary fails
    codes = torch.zeros(8, 4, 16, 16)
    codes[:, 0, 2, 2] = codes[:, 1, 3, 3] = codes[:, 3, 4, 4] = 1.0  # atom 2 never fires
    usage = atom_usage(codes)
    assert usage.tolist() == [8.0, 8.0, 0.0, 8.0] and used_atoms(usage) == 3
    dead = dead_atoms(usage)
    assert dead.tolist() == [2]
    replaced = resample_atoms(d, residual, dead)
    assert replaced.tolist() == [2]
    w = d.weight.detach()
    patch = torch.arange(25.0).view(1, 5, 5)
    assert torch.allclose(w[2], patch / patch.norm(), atol=1e-6)
    assert _unit_norm(w)
    assert torch.equal(w[[0, 1, 3]], before[[0, 1, 3]])  # the live atoms are untouched
    # with the coded images given, the new atom is the image patch where the residual is largest
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    resample_atoms(d, residual, torch.tensor([0]), images=images)
    patch = images[1, :, 3:8, 6:11]
    assert torch.allclose(d.weight.detach()[0], patch / patch.norm(), atol=1e-6)


def _synthetic(atoms: torch.Tensor, n: int, size: int, per_image: int, seed: int) -> torch.Tensor:
    """[0, 1] images made of ``per_image`` random atoms at random places (stride 1) around grey 0.5."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, atoms.shape[0], size, size)
    for i in range(n):
        k = torch.randint(0, atoms.shape[0], (per_image,), generator=g)
        pos = torch.randint(2, size - 2, (per_image, 2), generator=g)
        sign = torch.sign(torch.randn(per_image, generator=g))
        amp = (0.15 + 0.1 * torch.rand(per_image, generator=g)) * sign
        codes[i, k, pos[:, 0], pos[:, 1]] = amp
    images = torch.nn.functional.conv_transpose2d(codes, atoms, padding=atoms.shape[-1] // 2)
    return (0.5 + images).clamp(0, 1)


def test_a_tiny_run_uses_every_atom_on_images_made_of_known_atoms() -> None:
    """Images built from 6 known atoms; a 6-atom dictionary learned from random atoms with resampling
    uses every atom on held-out images of the same kind and codes them at a lower energy than its
    random start."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from warplca.data import Normalization
    from warplca.lca import LCA, atom_usage, used_atoms
    from warplca.modules.dictionary_learning import DictionaryLearning

    truth = ConvDictionary(6, 1, 5, 1, seed=11).weight.detach()
    train_images = _synthetic(truth, 96, 16, 5, seed=0)
    test_images = _synthetic(truth, 32, 16, 5, seed=1)
    norm = Normalization.fit(train_images, kind="image_mean")
    loader = DataLoader(TensorDataset(train_images, torch.zeros(96, dtype=torch.int64)), batch_size=16,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    d = ConvDictionary(6, 1, 5, 1, seed=0)
    start = ConvDictionary(6, 1, 5, 1, seed=0)
    module = DictionaryLearning(d, {"threshold": "hard", "lam": 0.05, "tau": "auto"}, norm, lr=0.02,
                                optimizer="adam", iters=30, resample_every=6, lr_schedule="cosine",
                                log_images_every_n_epochs=0)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, loader)
    assert _unit_norm(d.weight.detach())
    assert trainer.callback_metrics["train/atoms_used"] == 6
    x = norm.apply(test_images)
    res = LCA(d, threshold="hard", lam=0.05, tau="auto", iters=200)(x)
    assert used_atoms(atom_usage(res.a)) == 6
    before = LCA(start, threshold="hard", lam=0.05, tau="auto", iters=200)(x)
    assert res.energy.mean() < 0.7 * before.energy.mean()


def test_load_from_checkpoint_rebuilds_the_module(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from warplca.data import Normalization
    from warplca.modules.dictionary_learning import DictionaryLearning

    images = torch.rand(16, 3, 16, 16)
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.int64)), batch_size=8)
    norm = Normalization.fit(images, kind="lowpass", lowpass_lambda=3.0)
    module = DictionaryLearning(ConvDictionary(6, 3, 5, 2, seed=0), {"threshold": "soft", "lam": 0.1,
                                "tau": "auto"}, norm, iters=5, resample_every=2, log_images_every_n_epochs=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    path = tmp_path / "dl.ckpt"
    trainer.save_checkpoint(path)
    again = DictionaryLearning.load_from_checkpoint(path)
    assert torch.equal(again.dictionary.weight, module.dictionary.weight)
    assert again.normalization == norm and again.lca.settings() == module.lca.settings()
    assert again.resample_every == 2 and again.iters == 5


def test_module_validates_its_inputs() -> None:
    from warplca.data import Normalization
    from warplca.modules.dictionary_learning import DictionaryLearning

    d = ConvDictionary(4, 3, 5, 2)
    with pytest.raises(ValueError, match="channels"):
        DictionaryLearning(d, {}, Normalization.identity(1))
    with pytest.raises(ValueError, match="optimizer"):
        DictionaryLearning(d, {}, Normalization.identity(3), optimizer="lbfgs")
    with pytest.raises(ValueError, match="lam"):
        DictionaryLearning(d, {"lam": -1.0}, Normalization.identity(3))
    with pytest.raises(ValueError, match="coherence_weight"):
        DictionaryLearning(d, {}, Normalization.identity(3), coherence_weight=-1.0)


def test_resume_continues_the_step_count(make_cfg, tmp_path, caplog) -> None:
    out = tmp_path / "resume"
    first = train(make_cfg(output_dir=out))
    steps = first["dictionary/global_step"]
    assert steps > 0 and (out / "checkpoints" / "dictionary" / "last.ckpt").is_file()
    (out / "dictionary.pt").unlink()  # as if the run had died before saving its artifact
    caplog.set_level("INFO")
    second = train(make_cfg("model.dictionary.trainer.max_epochs=2", output_dir=out))
    assert "resuming the dictionary stage" in caplog.text
    assert second["dictionary/global_step"] == 2 * steps
    assert second["dictionary/epochs"] == 2
    assert (out / "dictionary.pt").is_file()


def test_rerun_skips_and_force_redoes(make_cfg, tmp_path, caplog) -> None:
    out = tmp_path / "skip"
    train(make_cfg(output_dir=out))
    stamp = (out / "dictionary.pt").stat().st_mtime_ns
    caplog.set_level("INFO")
    metrics = train(make_cfg(output_dir=out))
    assert "skipping dictionary: dictionary.pt exists (force=true to redo)" in caplog.text
    assert (out / "dictionary.pt").stat().st_mtime_ns == stamp
    assert "dictionary/test/psnr" in metrics  # reported from metrics.json
    train(make_cfg("force=true", output_dir=out))
    assert (out / "dictionary.pt").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_logger_without_network(make_cfg, tmp_path, monkeypatch, mode) -> None:
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    import wandb

    wandb.teardown()  # wandb caches the mode of its first setup in this process; start afresh
    cfg = make_cfg("logger=many", output_dir=tmp_path / "wb")
    try:
        metrics = train(cfg)
    finally:
        wandb.teardown()
    assert "dictionary/test/psnr" in metrics
    assert wandb.run is None  # the task wrapper finished it
    run = Path(cfg.paths.output_dir)
    assert (run / "csv" / "dictionary" / "metrics.csv").is_file()
    assert any((run / "tensorboard" / "dictionary").glob("events.*"))
    if mode == "offline":
        assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run written"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_artifacts_and_second_run_skips(tmp_path) -> None:
    from conftest import TINY_OVERRIDES

    run = tmp_path / "cli_run"
    args = (*TINY_OVERRIDES, f"hydra.run.dir={run}")
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("dictionary.pt", "metrics.json", "checkpoints/dictionary/last.ckpt", ".hydra/config.yaml",
                 "train.log"):
        assert (run / name).exists(), name
    assert "test/psnr" in json.loads((run / "metrics.json").read_text())["dictionary"]
    second = _cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping dictionary: dictionary.pt exists" in (run / "train.log").read_text()


def test_cli_bad_override_names_the_key(tmp_path) -> None:
    """The CLI exits non-zero with the key in its message (data=nope is checked in-process)."""
    bad = _cli("lca.lam=-1", "stages=[dictionary]", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode != 0 and "lca.lam=-1" in bad.stderr
    assert not (tmp_path / "bad" / "dictionary.pt").exists()


@pytest.mark.slow
def test_cli_sweep(tmp_path) -> None:
    from conftest import TINY_OVERRIDES

    sweep = tmp_path / "sweep"
    res = _cli("-m", *TINY_OVERRIDES, "lca.lam=0.25,0.5", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "dictionary.pt").is_file()
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes(make_cfg, tmp_path) -> None:
    cfg = make_cfg("trainer=ddp_cpu", "logger=csv", output_dir=tmp_path / "ddp")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    learned = ConvDictionary.load(run / "dictionary.pt")
    assert _unit_norm(learned.weight)
    assert metrics["dictionary/test/psnr"] > 0
    # the weights came back from the spawned ranks
    initial = build_dictionary(RunContext.from_config(cfg))
    assert not torch.allclose(learned.weight, initial.weight)
