"""WarpRegression through a real Trainer, and the targets → warp stages through the Hydra config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from warplca import LCA, ConvDictionary, WarpCNN, WarpLCA
from warplca.config import default_config_dir
from warplca.data.normalization import Normalization
from warplca.data.target_cache import TargetCache, TargetCacheMismatchError, TargetDataModule, TargetDataset
from warplca.modules.target_builder import build_target_cache
from warplca.modules.warp_regression import WarpRegression

NORM = Normalization(mean=(0.5, 0.45, 0.4), scale=1.0)
EVAL = (0, 5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[TensorDataset, ConvDictionary, LCA, TargetCache]:
    g = torch.Generator().manual_seed(0)
    # smooth-ish images: upsampled noise, so there is structure to predict
    images = torch.nn.functional.interpolate(torch.rand(64, 3, 6, 6, generator=g), size=(16, 16),
                                             mode="bilinear", align_corners=False)
    ds = TensorDataset(images, torch.zeros(64, dtype=torch.int64))
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=1)
    lca = LCA(d, threshold="hard", lam=0.05, tau="auto")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    cache = build_target_cache(tmp_path_factory.mktemp("targets") / "train", ds, d, lca, 20, NORM,
                               chunk_size=32, batch_size=32, trainer=trainer)
    return ds, d, lca, cache


class _Counting(WarpRegression):
    """Counts the LCA validation chains per start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chains: list[str] = []

    def _lca_chain(self, x: torch.Tensor, u0: torch.Tensor | None, start: str, images: torch.Tensor) -> None:
        self.chains.append(start)
        super()._lca_chain(x, u0, start, images)


def _module(d: ConvDictionary, lca: LCA, **kw: Any) -> _Counting:
    torch.manual_seed(0)
    kw.setdefault("lr", 3e-3)
    return _Counting(WarpCNN(3, 6, 2, width=16, depth=2), d, lca.settings(), NORM.to_dict(), loss="laplacian",
                     gamma=3.0, eval_iters=EVAL, scheduler=None, **kw)


def _trainer(epochs: int, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


@torch.no_grad()
def _state_loss(module: WarpRegression, td: TargetDataset) -> float:
    images, states = next(iter(DataLoader(td, batch_size=len(td))))
    return float(module.loss_fn(module(NORM.apply(images)), states))


def test_fit_lowers_the_state_loss_and_logs_warm_vs_cold(data: Any) -> None:
    ds, d, lca, cache = data
    td = TargetDataset(cache, ds)
    module = _module(d, lca, lca_eval_every_n_epochs=1)
    before = _state_loss(module, td)
    trainer = _trainer(6)
    trainer.fit(module, datamodule=TargetDataModule(td, td, batch_size=16))
    after = _state_loss(module, td)
    assert after < 0.5 * before, (before, after)
    m = trainer.callback_metrics
    for k in EVAL:
        for start in ("warm", "cold"):
            for name in ("energy", "energy_norm", "psnr", "ssim", "l0_frac", "l0_per_image"):
                assert f"val/{start}_k{k}/{name}" in m
        assert f"val/energy_ratio_k{k}" in m
    assert float(m["val/state_r2"]) > 0.0
    assert float(m["val/cold_k0/l0_frac"]) == 0.0  # u = 0: nothing active
    # cold numbers: computed in the first validation epoch only (4 batches), warm every epoch
    assert module.chains.count("cold") == 4 and module.chains.count("warm") == 6 * 4
    assert module.cold_values is not None and "val/cold_k5/psnr" in module.cold_values
    # the bundle predicts what the module predicts
    bundle = module.bundle()
    assert isinstance(bundle, WarpLCA)
    x = NORM.apply(ds.tensors[0][:4])
    assert torch.allclose(bundle.predict_states(x), module(x).detach(), atol=1e-6)


class _LoggedKeys(pl.Callback):
    """The validation metrics each epoch logged."""

    def __init__(self) -> None:
        self.epochs: list[set[str]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(set(trainer.logged_metrics))


def test_lca_evaluation_interval_and_resume(data: Any, tmp_path: Path) -> None:
    ds, d, lca, cache = data
    td = TargetDataset(cache, ds)
    dm = TargetDataModule(td, td, batch_size=32)
    module = _module(d, lca, lca_eval_every_n_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    logged = _LoggedKeys()
    trainer = _trainer(3, callbacks=[ckpt, logged], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    assert module.chains.count("warm") == 2 * 2  # epochs 2 and 3 (the last), 2 batches each
    assert module.chains.count("cold") == 2
    # the state fit is logged every epoch, the LCA comparisons only on the epochs that ran them
    assert [{"val/state_mse", "val/state_r2"} <= keys for keys in logged.epochs] == [True] * 3
    assert ["val/energy_ratio_k5" in keys for keys in logged.epochs] == [False, True, True]
    # resume: the cold numbers come back from the checkpoint, training continues where it stopped
    resumed = _module(d, lca, lca_eval_every_n_epochs=2)
    trainer2 = _trainer(4, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
                        enable_checkpointing=True)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.cold_values == module.cold_values
    assert resumed.chains == ["warm", "warm"]  # only epoch 4 validated, no cold recomputation
    assert trainer2.global_step == 4 * 2
    # the checkpoint alone rebuilds the module: predictor, dictionary, LCA, normalisation, cold numbers
    again = WarpRegression.load_from_checkpoint(tmp_path / "last.ckpt")
    x = NORM.apply(ds.tensors[0][:4])
    assert torch.equal(again(x), resumed(x))
    assert torch.equal(again.dictionary.weight, d.weight) and again.lca.settings() == resumed.lca.settings()
    assert again.normalization == NORM and again.cold_values == resumed.cold_values
    assert again.lca_eval_every_n_epochs == 2 and again.hparams["dictionary_fingerprint"] == d.fingerprint()


def test_bad_settings_are_refused(data: Any) -> None:
    _, d, lca, _ = data
    net = WarpCNN(3, 6, 2, width=4, depth=1)
    with pytest.raises(ValueError, match="unknown loss"):
        WarpRegression(net, d, lca.settings(), loss="huber")
    with pytest.raises(ValueError, match="scheduler"):
        WarpRegression(net, d, lca.settings(), scheduler="step")
    with pytest.raises(ValueError, match="eval_iters"):
        WarpRegression(net, d, lca.settings(), eval_iters=(-1, 3))
    with pytest.raises(ValueError, match="energy_weight"):
        WarpRegression(net, d, lca.settings(), energy_weight=-1.0)


@torch.no_grad()
def _start_energy(module: WarpRegression, images: torch.Tensor) -> float:
    x = NORM.apply(images)
    return float(module.lca.energy(x, module.lca.threshold(module(x))).mean())


def test_energy_fine_tune_lowers_the_energy_of_the_start(data: Any) -> None:
    """The same regression fine-tuned with and without the energy term, from the same weights: the term
    lowers the LCA energy of the predicted start on the training images, and it is logged."""
    ds, d, lca, cache = data
    td = TargetDataset(cache, ds)
    base = _module(d, lca)
    _trainer(4, limit_val_batches=0).fit(base, datamodule=TargetDataModule(td, None, batch_size=16))
    ends = {}
    for weight in (0.0, 0.05):
        module = _module(d, lca, energy_weight=weight)
        module.predictor.load_state_dict(base.predictor.state_dict())
        trainer = _trainer(4, limit_val_batches=0)
        trainer.fit(module, datamodule=TargetDataModule(td, None, batch_size=16))
        ends[weight] = _start_energy(module, ds.tensors[0])
        assert ("train/energy" in trainer.callback_metrics) == (weight > 0)
    assert ends[0.05] < 0.9 * ends[0.0], ends


# -------------------------------------------------------------------------------------------------
# the stages through the Hydra config
# -------------------------------------------------------------------------------------------------


def _overrides(dictionary: Path, *extra: str) -> list[str]:
    conf = default_config_dir() / "train.yaml"
    in_defaults = any(line.strip().startswith("- targets:") for line in conf.read_text().splitlines())
    return ["stages=[targets,warp]", f"dictionary_path={dictionary}",
            "targets=default" if in_defaults else "+targets=default",
            "targets.iters=10", "targets.chunk_size=32", "targets.batch_size=32",
            "data.n_train=64", "data.n_val=32", "data.n_test=16",
            "model.warp.epochs=2", "model.warp.eval_iters=[0,3]", "model.warp.batch_size=32",
            "model.warp.lca_eval_every_n_epochs=1", "model.warp.finetune.epochs=1",
            "trainer.enable_progress_bar=false", *extra]


def test_targets_and_warp_stages(tmp_path: Path) -> None:
    import shutil

    import warplca.tasks.train as tasks  # the project's own module: a broken import must fail, not skip
    from warplca.config import compose_config
    from warplca.data import NaturalDataModule
    from warplca.tasks.provenance import ProvenanceMismatchError

    dm = NaturalDataModule(n_train=64, n_val=32, n_test=16)
    dictionary = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=0)
    dict_path = dictionary.save(tmp_path / "dictionary.pt", normalization=dm.normalization.to_dict())
    run = tmp_path / "run"
    cfg = compose_config(_overrides(dict_path), output_dir=run)
    metrics = tasks.train(cfg)
    assert (run / "targets" / "COMPLETE").is_file()
    for split in ("train", "val"):
        assert TargetCache.open(run / "targets" / split).count == {"train": 64, "val": 32}[split]
    model = WarpLCA.load(run / "warp_lca.pt")
    assert model.dictionary.fingerprint() == dictionary.fingerprint()
    assert model.normalization == dm.normalization
    assert model.lca.settings() == LCA(dictionary, **{k: v for k, v in cfg.lca.items()}).settings()
    assert metrics["targets/train/count"] == 64
    assert "warp/val/warm_k3/psnr" in metrics and "warp/val/cold_k3/psnr" in metrics
    assert metrics["warp/predictor_params"] == model.predictor.num_parameters()
    assert (run / "checkpoints" / "warp" / "last.ckpt").is_file()
    # the energy fine-tune ran after the regression, as a Trainer of its own; the bundle holds its predictor
    tuned = torch.load(run / "checkpoints" / "warp_finetune" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert tuned["hyper_parameters"]["energy_weight"] == 0.001 and tuned["epoch"] == 1
    for name, value in model.predictor.state_dict().items():
        assert torch.equal(value, tuned["state_dict"][f"predictor.{name}"]), name
    regression = torch.load(run / "checkpoints" / "warp" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert regression["hyper_parameters"]["energy_weight"] == 0.0
    assert any(not torch.equal(v, tuned["state_dict"][k]) for k, v in regression["state_dict"].items()
               if k.startswith("predictor."))
    assert metrics["warp/train/energy"] > 0

    # the same command again: both stages are done and skipped
    stamp = (run / "warp_lca.pt").stat().st_mtime_ns
    again = tasks.train(compose_config(_overrides(dict_path), output_dir=run))
    assert (run / "warp_lca.pt").stat().st_mtime_ns == stamp
    assert again["warp/predictor_params"] == metrics["warp/predictor_params"]

    # another λ: the cached targets were made with the old one and are refused before any work, naming the key
    (run / "warp_lca.pt").unlink()
    refused = r"targets \(targets/COMPLETE\):\n    lca\.lam: .* -> 0\.123"
    with pytest.raises(ProvenanceMismatchError, match=refused):
        tasks.train(compose_config(_overrides(dict_path, "lca.lam=0.123"), output_dir=run))
    # without the record (a run of an older version) the cache's manifest still refuses them
    shutil.rmtree(run / "provenance")
    with pytest.raises(TargetCacheMismatchError, match="lam"):
        tasks.train(compose_config(_overrides(dict_path, "lca.lam=0.123"), output_dir=run))
