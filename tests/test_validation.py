"""Config validation (every problem at once, with its key) and input validation at the public entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from warplca import LCA, ConvDictionary
from warplca.config import (
    ConfigError,
    ConfigFileError,
    check_eval_config,
    check_train_config,
    default_config_dir,
    validate_eval_config,
    validate_train_config,
)

REPO = Path(__file__).resolve().parents[1]
CONF = default_config_dir()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _keys(problems: list[tuple[str, str]]) -> list[str]:
    return [k for k, _ in problems]


# -------------------------------------------------------------------------------------------------
# the shipped configs are valid
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["data", "dictionary", "lca", "trainer", "logger", "callbacks", "debug",
                                   "experiment", "predictor", "loss"])
def test_every_shipped_option_validates(make_cfg, group: str) -> None:
    for option in _options(group):
        problems = check_train_config(make_cfg(f"{group}={option}", tiny=False))
        if not torch.cuda.is_available():  # gpu / ddp: the only problem is the missing GPU, said clearly
            problems = [p for p in problems if "no CUDA GPU is visible" not in p[1]]
        assert problems == [], f"{group}={option}: {problems}"


def test_gpu_trainer_without_gpu_is_refused_before_anything_runs(make_cfg) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu: no CUDA GPU is visible"):
        validate_train_config(make_cfg("trainer=gpu"))


def test_eval_options_validate(make_cfg, tmp_path: Path) -> None:
    for option in _options("eval"):
        cfg = make_cfg(f"eval={option}", tiny=False, config_name="eval", output_dir=tmp_path / "ev")
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path)
        assert check_eval_config(cfg) == [], option


# -------------------------------------------------------------------------------------------------
# all problems, each with its key
# -------------------------------------------------------------------------------------------------


def test_lists_every_problem_with_its_key(make_cfg) -> None:
    cfg = make_cfg("lca.lam=-1", "dictionary.kernel_size=8", "+trainer.max_epoch=3", "loss.name=laplacain",
                   "data.batch_size=0", "dictionary.stride=0", "loss.gamma=-2", "model.dictionary.iters=0",
                   "stages=[dictionary,bogus]", "lca.threshold=hardd")
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    text = str(info.value)
    problems = info.value.problems
    assert text.startswith(f"{len(problems)} problems:\n  ")
    for key in ("lca.lam", "dictionary.kernel_size", "trainer.max_epoch", "loss.name", "data.batch_size",
                "dictionary.stride", "model.dictionary.iters", "stages", "lca.threshold"):
        assert key in _keys(problems), key
    assert "  lca.lam=-1: must be a finite number ≥ 0" in text
    assert "  dictionary.kernel_size=8: must be odd" in text
    assert "  loss.name=laplacain: unknown loss; known: laplacian, mse, l1" in text
    assert "stages=[dictionary,bogus]: unknown stage(s)" in text
    assert "unknown threshold; known: hard, soft, cel0, half" in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("override, key, fragment", [
    ("lca.tau=0", "lca.tau", "must be a finite number > 0 or auto"),
    ("lca.tau=fast", "lca.tau", "must be a finite number > 0 or auto"),
    ("lca.iters=1.5", "lca.iters", "must be an integer ≥ 0"),
    ("lca.nonneg=maybe", "lca.nonneg", "must be true or false"),
    ("lca=cel0", None, None),
    ("lca.tol=0", "lca.tol", "> 0"),
    ("+lca.lamda=1", "lca.lamda", "unknown key for LCA"),
    ("+lca.lamm=1", "lca.lamm", "did you mean lca.lam?"),
    ("predictor.kernel_size=4", "predictor.kernel_size", "must be odd"),
    ("predictor.activation=tanh", "predictor.activation", "unknown activation"),
    ("model.warp.eval_iters=[]", "model.warp.eval_iters", "non-empty list"),
    ("model.warp.batch_size=0", "model.warp.batch_size", "global batch"),
    ("model.warp.finetune.lr=0", "model.warp.finetune.lr", "> 0"),
    ("model.warp.finetune.energy_weight=-1", "model.warp.finetune.energy_weight", "≥ 0"),
    ("+model.warp.finetune.epoch=3", "model.warp.finetune.epoch", "did you mean model.warp.finetune.epochs?"),
    ("study.levers.energy_finetune.weights=[-0.1]", "study.levers.energy_finetune.weights", "≥ 0"),
    ("model.classify.backbone=vgg", "model.classify.backbone", "unknown backbone"),
    ("model.classify.frontends=[pixels,lcaa]", "model.classify.frontends", "unknown front end(s) lcaa"),
    ("+model.classify.corruptions.fog=[0.1]", "model.classify.corruptions", "unknown corruption 'fog'"),
    ("model.classify.corruptions.shot_noise=[0.0]", "model.classify.corruptions",
     "levels must be finite and > 0"),
    ("+model.dictionary.lrr=0.1", "model.dictionary.lrr", "unknown key for DictionaryLearning"),
    ("model.dictionary.coherence_weight=-0.1", "model.dictionary.coherence_weight", "coherence penalty"),
    ("predictor.drive_scale=0", "predictor.drive_scale", "drive"),
    ("++targets.splits=[val]", "targets.splits", "must include train"),
    ("++targets.chunk_size=0", "targets.chunk_size", "≥ 1"),
    ("++targets.iter=3", "targets.iter", "did you mean targets.iters?"),
    ("+targets.lam=0.1", "targets.lam", "it belongs to lca.lam"),
    ("targets.solver=warm", "targets.solver", "unknown target solver"),
    ("+targets.continuation.start=2", "targets.continuation.start", "unknown key for Continuation"),
    ("+model.warp.loss=mse", "model.warp.loss", "top-level loss group, e.g. loss=mse"),
    ("+model.warp.gamma=2", "model.warp.gamma", "loss.gamma"),
    ("+model.warp.predictor.width=8", "model.warp.predictor", "top-level predictor group"),
    ("+model.warp.lrr=0.1", "model.warp.lrr", "did you mean model.warp.lr?"),
    ("+model.warp.lam=0.1", "model.warp.lam", "it belongs to lca.lam"),
    ("+model.classify.lca_iter_cold=600", "model.classify.lca_iter_cold",
     "did you mean model.classify.lca_iters_cold?"),
    ("+study.iter=3", "study.iter", "did you mean study.iters?"),
    ("+study.ablation.loss=[mse]", "study.ablation.loss", "did you mean study.ablation.losses?"),
    ("+study.learning_curve.size=[64]", "study.learning_curve.size",
     "did you mean study.learning_curve.sizes?"),
    ("+eval.n_image=8", "eval.n_image", "did you mean eval.n_images?"),
    ("+eval.convergence.timing.enable=false", "eval.convergence.timing.enable", "timing.enabled"),
    ("eval.n_images=8", None, None),
    ("+trainer.num_node=2", "trainer.num_node", "did you mean trainer.num_nodes?"),
    ("+model.warp.trainer.max_epoch=2", "model.warp.trainer.max_epoch", "unknown key for Trainer"),
    ("trainer.check_val_every_n_epoch=0.5", "trainer.check_val_every_n_epoch", "must be an integer or null"),
    ("data._target_=warplca.data.NoSuchData", "data._target_", "cannot be imported"),
    ("data._target_=warplca.lca.ConvDictionary", "data._target_", "LightningDataModule"),
    ("+data.n_trian=4", "data.n_trian", "unknown key for NaturalDataModule"),
    ("data.crop_size=-3", "data.crop_size", "≥ 1"),
    ("norm.kind=zscore", "norm.kind", "unknown normalisation"),
    ("+norm.lowpass_lam=3", "norm.lowpass_lam", "did you mean norm.lowpass_lambda?"),
    ("norm.scale=0", "norm.scale", "> 0"),
    ("norm=lowpass", None, None),
    ("model.dictionary.resample_every=-1", "model.dictionary.resample_every", "≥ 0"),
    ("+logger.csv.flush_logs_every_n_step=3", "logger.csv.flush_logs_every_n_step", "unknown key"),
    ("+callbacks.model_checkpoint.every_n_train_step=3", "callbacks.model_checkpoint.every_n_train_step",
     "unknown key"),
    ("seed=-1", "seed", "≥ 0"),
    ("force=yes", "force", "true or false"),
])
def test_single_problems(make_cfg, override: str, key: str | None, fragment: str | None) -> None:
    problems = check_train_config(make_cfg(override))
    if key is None:
        assert problems == []
        return
    matching = [m for k, m in problems if k == key]
    assert matching, f"{override}: no problem for {key} in {problems}"
    assert any(fragment in m for m in matching), matching


@pytest.mark.parametrize("override", ["++trainer.strategy=dpp", "trainer.devices=0",
                                      "trainer.accelerator=tpuu", "trainer.num_nodes=0",
                                      "trainer.limit_train_batches=1.5", "+trainer.fast_dev_run=-1"])
def test_trainer_values_lightning_refuses_are_left_to_it(make_cfg, override: str) -> None:
    """Lightning refuses these when the first stage builds its Trainer, before any batch runs; the
    validation does not repeat its rules (it checks the values Lightning would accept)."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from warplca.tasks.context import RunContext

    cfg = make_cfg(override)
    assert check_train_config(cfg) == []
    kwargs = RunContext.from_config(cfg).trainer_kwargs("dictionary")
    kwargs.pop("_target_")
    with pytest.raises((ValueError, TypeError, MisconfigurationException)):
        pl.Trainer(**kwargs, logger=False, enable_checkpointing=False)


def test_misplaced_warp_loss_is_refused_by_name(make_cfg) -> None:
    """``+model.warp.loss=mse`` used to pass validation and crash the warp stage (``'str' object has no
    attribute 'get'``); it is refused before anything runs, naming the key and where the loss is chosen."""
    cfg = make_cfg("+model.warp.loss=mse", "stages=[dictionary,targets,warp]")
    problems = check_train_config(cfg)
    assert _keys(problems) == ["model.warp.loss"], problems
    assert "model.warp.loss=mse: does not belong under model.warp" in problems[0][1]
    assert "loss=mse" in problems[0][1].split("model.warp:", 1)[1]
    with pytest.raises(ConfigError, match=r"model\.warp\.loss=mse"):
        validate_train_config(cfg)


def test_unknown_keys_of_every_stage_node_are_refused_each_by_name(make_cfg) -> None:
    problems = check_train_config(make_cfg("+targets.bogus=1", "+study.bogus=1", "+model.warp.bogus=1",
                                           "+model.classify.bogus=1", "+study.ablation.bogus=1"))
    assert sorted(_keys(problems)) == ["model.classify.bogus", "model.warp.bogus", "study.ablation.bogus",
                                       "study.bogus", "targets.bogus"]


def test_theta_has_one_rule_for_every_threshold(make_cfg) -> None:
    """θ ∈ (0, 1) is declared once (LCA's signature): the config and the Python API refuse 1.5 alike."""
    for option in ("cel0", "hard"):
        problems = check_train_config(make_cfg(f"lca={option}", "lca.theta=1.5"))
        assert [m for k, m in problems if k == "lca.theta"] == [
            "lca.theta=1.5: must be a finite number > 0 and < 1 (θ of the cel0 threshold)"], option
    with pytest.raises(ValueError, match=r"theta=1\.5: must be a finite number > 0 and < 1"):
        LCA(ConvDictionary(8, 3, 5, 2), theta=1.5)


def test_trainer_values_lightning_declares_are_checked_against_its_signature(make_cfg) -> None:
    problems = check_train_config(make_cfg("trainer.precision=bf15"))
    assert _keys(problems) == ["trainer.precision"], problems


def test_unresolvable_interpolation_is_a_problem(make_cfg) -> None:
    problems = check_train_config(make_cfg("data.batch_size=${nowhere.to.be.found}"))
    assert any(k == "data.batch_size" and "cannot be resolved" in m for k, m in problems)


# -------------------------------------------------------------------------------------------------
# artifacts named in the config
# -------------------------------------------------------------------------------------------------


def _save_dictionary(path: Path, channels: int = 3) -> ConvDictionary:
    d = ConvDictionary(n_atoms=8, in_channels=channels, kernel_size=5, stride=2, seed=0)
    d.save(path)
    return d


def test_numeric_tau_is_checked_against_the_given_dictionary(make_cfg, tmp_path: Path) -> None:
    d = _save_dictionary(tmp_path / "d.pt")
    lip = d.operator_norm(32, 32)
    bad = make_cfg(f"dictionary_path={tmp_path / 'd.pt'}", f"lca.tau={lip / 4:.6f}")
    with pytest.raises(ConfigError, match=r"lca\.tau=.*unstable for dictionary_path=.*τ > L/2"):
        validate_train_config(bad)
    validate_train_config(make_cfg(f"dictionary_path={tmp_path / 'd.pt'}", f"lca.tau={lip * 1.1:.6f}"))


def test_numeric_tau_is_checked_against_the_initial_dictionary(make_cfg) -> None:
    problems = check_train_config(make_cfg("lca.tau=0.01"))
    assert any(k == "lca.tau" and "initial dictionary" in m for k, m in problems)
    assert check_train_config(make_cfg("lca.tau=1000")) == []


def test_channel_mismatch_between_data_and_dictionary(make_cfg, tmp_path: Path) -> None:
    _save_dictionary(tmp_path / "rgb.pt", channels=3)
    cfg = make_cfg("data=digits", f"dictionary_path={tmp_path / 'rgb.pt'}")
    with pytest.raises(ConfigError, match="DigitsDataModule yields 1-channel images but dictionary_path=.* "
                                          "3-channel atoms"):
        validate_train_config(cfg)
    validate_train_config(make_cfg("data=digits", "data.rgb=true", f"dictionary_path={tmp_path / 'rgb.pt'}"))


def test_truncated_and_foreign_artifacts_are_refused_naming_the_file(make_cfg, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    _save_dictionary(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, fragment in ((truncated, "truncated or corrupt"), (foreign, "is not a warplca.dictionary")):
        with pytest.raises(ConfigError) as info:
            validate_train_config(make_cfg(f"dictionary_path={path}"))
        assert str(path) in str(info.value) and fragment in str(info.value)
    with pytest.raises(ConfigError, match=r"warp_path=.*not a warplca.bundle"):
        validate_train_config(make_cfg(f"warp_path={good}"))  # a dictionary is not a bundle


def test_missing_files_raise_a_file_not_found_config_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dictionary_path=.*nope\.pt: no such file") as info:
        validate_train_config(make_cfg(f"dictionary_path={tmp_path / 'nope.pt'}", "lca.lam=-1"))
    assert isinstance(info.value, ConfigFileError) and len(info.value.problems) == 2


def test_resumed_run_dictionary_is_checked(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_dictionary(run / "dictionary.pt", channels=3)
    problems = check_train_config(make_cfg("data=digits", output_dir=run))
    assert any(k == "data" and "1-channel" in m for k, m in problems)
    assert check_train_config(make_cfg("data=digits", "force=true", output_dir=run)) == []


# -------------------------------------------------------------------------------------------------
# DDP + multirun
# -------------------------------------------------------------------------------------------------


def test_script_relaunching_ddp_is_refused_inside_a_multirun(make_cfg, monkeypatch) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    try:
        for option, refused in (("ddp_cpu_script", True), ("ddp_cpu", False), ("cpu", False)):
            cfg = make_cfg(f"trainer={option}")
            OmegaConf.set_readonly(cfg.hydra, False)
            with open_dict(cfg):
                cfg.hydra.mode = RunMode.MULTIRUN
            HydraConfig().set_config(cfg)
            keys = _keys(check_train_config(cfg))
            assert ("trainer.strategy" in keys) is refused, option
        monkeypatch.setenv("SLURM_NTASKS", "2")  # one SLURM task per rank: nothing is re-launched
        assert "trainer.strategy" not in _keys(check_train_config(cfg))
    finally:
        HydraConfig.instance().cfg = None  # no MULTIRUN mode leaks into later tests


# -------------------------------------------------------------------------------------------------
# the evaluate config
# -------------------------------------------------------------------------------------------------


def test_eval_config_problems(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("eval=convergence", "eval.batch_size=0", "eval.budgets=[0,10]", "device=gpu0",
                   "eval.modes=[convergence,bogus]", tiny=False, config_name="eval",
                   output_dir=tmp_path / "ev")
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "no_such_run")
    with pytest.raises(ConfigError) as info:
        validate_eval_config(cfg)
    keys = _keys(info.value.problems)
    assert {"eval.batch_size", "eval.budgets", "device", "eval.modes", "run_dir"} <= set(keys)
    assert isinstance(info.value, FileNotFoundError)  # the run directory is missing
    with open_dict(cfg):
        cfg.run_dir = None
    assert any("is required" in m for _, m in check_eval_config(cfg))


# -------------------------------------------------------------------------------------------------
# the CLI fails fast, listing the problems
# -------------------------------------------------------------------------------------------------


def test_cli_reports_all_problems_before_running(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "lca.lam=-1", "dictionary.kernel_size=8",
                          "+lca.lamda=0", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "3 problems:" in res.stderr
    for line in ("lca.lam=-1: must be", "dictionary.kernel_size=8: must be odd",
                 "lca.lamda: unknown key for LCA"):
        assert line in res.stderr, line
    assert not (tmp_path / "run" / "dictionary.pt").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# -------------------------------------------------------------------------------------------------
# input validation at the public API entries
# -------------------------------------------------------------------------------------------------


def test_solver_refuses_wrong_inputs() -> None:
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    lca = LCA(d, lam=0.3, tau="auto")
    with pytest.raises(ValueError, match="rank 4"):
        lca(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="1 channels but the dictionary expects 3"):
        lca(torch.rand(2, 1, 16, 16))  # e.g. digits through an RGB dictionary
    with pytest.raises(ValueError, match="NaN or Inf"):
        lca(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        lca(torch.rand(0, 3, 16, 16))
    with pytest.raises(ValueError, match="odd"):
        ConvDictionary(8, 3, 4, 2)
    with pytest.raises(ValueError, match="lam"):
        LCA(d, lam=-1.0)


def test_bundle_preprocess_refuses_pixels_outside_unit_range() -> None:
    from warplca import WarpCNN, WarpLCA
    from warplca.data import Normalization

    d = ConvDictionary(8, 3, 5, 2, seed=0)
    model = WarpLCA(d, WarpCNN(3, 8, 2, width=8, depth=2), LCA(d, lam=0.3, tau="auto"),
                    Normalization(mean=(0.5, 0.5, 0.5)))
    assert model.preprocess(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images in \[0, 1\].*divide by 255"):
        model.preprocess(torch.rand(2, 3, 16, 16) * 255)
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        model.preprocess(torch.rand(2, 3, 16, 16) - 0.5)


def test_datasets_refuse_bad_float_images_and_empty_splits() -> None:
    import numpy as np

    from warplca.data.datamodule import ArrayImageDataset
    from warplca.data.resumable import ResumableDataLoader

    ArrayImageDataset(np.random.rand(4, 3, 8, 8).astype(np.float32), [0, 1, 2, 3])  # fine
    ArrayImageDataset(np.full((2, 1, 8, 8), 255, dtype=np.uint8), [0, 1])  # uint8 is scaled
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ArrayImageDataset(np.full((2, 3, 8, 8), 3.0, dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match="finite"):
        ArrayImageDataset(np.full((2, 3, 8, 8), np.nan, dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        ArrayImageDataset(np.zeros((2, 8, 8), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match="empty"):
        ResumableDataLoader([], batch_size=4)


def test_empty_split_is_refused() -> None:
    from warplca.data import NaturalDataModule

    with pytest.raises(ValueError, match="n_train"):
        NaturalDataModule(n_train=0)
