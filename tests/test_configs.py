"""Hydra configs: every group option composes and instantiates; bad overrides fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fakes import (
    as_item,
    cifar_image,
    cifar_label,
    forbid_downloads,
    make_cifar10,
    make_folder,
    make_pets,
    make_stl10,
    pets_item,
    pets_list,
    stl_image,
    stl_label,
)
from hydra.errors import HydraException
from omegaconf import OmegaConf

from warplca.config import default_config_dir, validate_train_config
from warplca.lca import LCA, ConvDictionary
from warplca.lca.solver import SETTINGS
from warplca.tasks.context import RunContext
from warplca.tasks.stages import STAGE_ORDER, STAGES, parse_stages, resolve_stages, stage_done
from warplca.tasks.train import train
from warplca.tasks.utils import flatten_metrics, get_metric_value

CONF = default_config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_train_config_top_level(make_cfg, tmp_path) -> None:
    cfg = make_cfg(tiny=False)
    for key in ("stages", "seed", "force", "resume", "dictionary_path", "warp_path", "run_dir", "task_name"):
        assert key in cfg, key
    assert list(cfg.stages) == ["dictionary", "targets", "warp", "report"]
    assert cfg.force is False and cfg.dictionary_path is None
    assert cfg.paths.output_dir == str((tmp_path / "run").resolve())
    assert cfg.dictionary.n_atoms == 64 and cfg.dictionary.kernel_size == 9 and cfg.dictionary.stride == 2
    assert set(cfg.lca) >= {"threshold", "lam", "tau", "iters", "nonneg", "theta", "tol"}
    assert cfg.lca.threshold == "hard" and cfg.lca.tau == "auto" and cfg.lca.iters == 1000
    assert "_target_" in cfg.model.dictionary
    assert cfg.trainer.accelerator == "cpu"
    assert "wandb" not in cfg.logger and "csv" in cfg.logger
    # `lca.lam=0.5` style overrides work on every lca option
    assert make_cfg("lca=soft", "lca.lam=0.25", tiny=False).lca.lam == 0.25


def test_run_dir_override_sets_the_hydra_run_dir() -> None:
    """``run_dir=<dir>`` becomes Hydra's run directory, hence the job's output directory and
    ``paths.output_dir`` (compose_config without ``output_dir`` keeps the composed ``hydra.run.dir``; the
    CLI side is checked by tests/test_cli_errors.py, whose ``run_dir=`` run leaves ``FAILED`` there)."""
    from warplca.config import compose_config

    raw = OmegaConf.to_container(OmegaConf.load(CONF / "hydra" / "default.yaml"), resolve=False)
    assert raw["run"]["dir"] == "${run_dir}"
    cfg = compose_config(["run_dir=/some/where"])
    assert cfg.hydra.run.dir == "/some/where" and cfg.run_dir == "/some/where"
    assert cfg.hydra.runtime.output_dir == str(Path("/some/where").resolve())
    assert cfg.paths.output_dir == cfg.hydra.runtime.output_dir
    default = compose_config([])
    assert default.hydra.run.dir == default.run_dir and default.run_dir.startswith("outputs/train/")


#: config groups of train.yaml whose every option must compose (``model`` is packaged per stage and has
#: its own test below; ``eval`` belongs to eval.yaml, see test_every_eval_option_composes)
GROUPS = ("data", "norm", "dictionary", "lca", "trainer", "logger", "callbacks", "debug", "experiment",
          "paths", "hydra", "predictor", "loss", "targets", "study", "hparams_search")
_OWN_TESTS = {"model", "eval"}
#: options that need an optional plugin; tests/test_sweeps.py checks them
_PLUGIN_OPTIONS = {("hparams_search", "optuna_lam_gamma")}
#: groups whose options write into other packages (``# @package _global_``, Hydra's own node)
_GLOBAL = {"experiment", "debug", "hydra", "hparams_search"}


def test_every_config_group_is_covered() -> None:
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert "data" in groups and "lca" in groups, f"{CONF} does not look like the config tree"
    assert groups - _OWN_TESTS == set(GROUPS), "add a new config group to GROUPS (or to _OWN_TESTS)"
    assert all(group in groups for group, _ in _PLUGIN_OPTIONS)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(make_cfg, group) -> None:
    opts = [o for o in options(group) if (group, o) not in _PLUGIN_OPTIONS]
    assert opts, f"no options in {CONF / group}"
    for option in opts:
        # experiments may switch datasets, so compose them without the natural-only tiny overrides
        cfg = make_cfg(f"{group}={option}", tiny=group not in ("experiment", "hparams_search"))
        assert cfg.hydra.runtime.choices[group] == option, f"{group}={option} was not selected"
        if group not in _GLOBAL:
            assert group in cfg, f"{group}={option} composed no {group} node"


def test_every_eval_option_composes(make_cfg) -> None:
    opts = options("eval")
    assert "convergence" in opts and "all" in opts
    for option in opts:
        cfg = make_cfg(f"eval={option}", tiny=False, config_name="eval")
        assert cfg.hydra.runtime.choices["eval"] == option and "eval" in cfg, f"eval={option}"


def test_model_options_compose(make_cfg) -> None:
    """Every model option fills every stage's slot: selected there, with a ``_target_`` and, for an option
    that is some slot's default, the same node as in that slot; the other slots keep their defaults."""
    default = make_cfg(tiny=False)
    stages = ("dictionary", "warp", "classify")
    home = {default.hydra.runtime.choices[f"model@model.{s}"]: s for s in stages}
    for stage in stages:
        for option in options("model"):
            cfg = make_cfg(f"model@model.{stage}={option}", tiny=False)
            assert cfg.hydra.runtime.choices[f"model@model.{stage}"] == option
            node = OmegaConf.to_container(cfg.model[stage], resolve=False)
            assert node.get("_target_"), f"model@model.{stage}={option} has no _target_"
            if option in home:
                assert node == OmegaConf.to_container(default.model[home[option]], resolve=False), option
            for other in stages:
                if other != stage:
                    assert cfg.model[other] == default.model[other], (stage, option, other)


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate_or_fail_cleanly_offline(make_cfg, option, tmp_path) -> None:
    """Embedded datasets load offline; on-disk ones (a ``data_dir`` option) without their files fail at the
    first batch, naming the directory (their loading is checked on fakes below)."""
    from warplca.data import DatasetNotFoundError

    cfg = make_cfg(f"data={option}", f"paths.data_dir={tmp_path / 'nodata'}")
    ctx = RunContext.from_config(cfg)
    dm = ctx.datamodule
    assert isinstance(dm, pl.LightningDataModule)
    if "data_dir" in cfg.data:
        with pytest.raises(DatasetNotFoundError, match="nodata"):
            next(iter(dm.train_dataloader()))
        return
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.float32 and images.dim() == 4 and images.shape[1] == dm.channels
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64


def _fake_on_disk(option: str, root: Path) -> tuple[int, dict[str, int], torch.Tensor, list[int], list[int]]:
    """Write the fake of on-disk data option ``option`` into ``root``. Returns the image side, the split sizes
    under the option's default ``val_fraction`` (0.1), the expected test images and labels (file order) and
    the labels of train and val together."""
    if option == "cifar10":
        make_cifar10(root)  # images 0..49 in the training batches, 50..59 in test_batch
        test = range(50, 60)
        return (32, {"train": 45, "val": 5, "test": 10}, torch.stack([as_item(cifar_image(i)) for i in test]),
                [cifar_label(i) for i in test], [cifar_label(i) for i in range(50)])
    if option == "stl10":
        make_stl10(root, n_train=20, n_test=10)
        test_images = torch.stack([as_item(stl_image(i)) for i in range(10)])
        return (96, {"train": 18, "val": 2, "test": 10}, test_images, [stl_label(i) for i in range(10)],
                [stl_label(i) for i in range(20)])
    if option == "pets":
        make_pets(root)  # 12 trainval and 6 test JPEGs of 40..90 px, resized to the default image_size 64
        test, trainval = pets_list(root, "test.txt"), pets_list(root, "trainval.txt")
        return (64, {"train": 11, "val": 1, "test": 6}, torch.stack([pets_item(p, 64) for p, _ in test]),
                [y for _, y in test], [y for _, y in trainval])
    if option == "folder":
        make_folder(root)  # 2 classes x 4 PNGs per split, image k of class c filled with 40c + k
        test = torch.stack([torch.full((3, 16, 16), (40 * c + k) / 255) for c in range(2) for k in range(4)])
        return 16, {"train": 8, "val": 8, "test": 8}, test, [0] * 4 + [1] * 4, [0] * 8 + [1] * 8
    raise AssertionError(f"no fake for the on-disk data option {option!r}: add one to _fake_on_disk")


@pytest.mark.parametrize("option", [o for o in options("data") if o not in ("natural", "digits")])
def test_on_disk_data_options_read_fakes_in_the_real_formats(make_cfg, option, tmp_path, monkeypatch) -> None:
    """The composed ``data=<option>`` config, pointed at a tiny fake in the published file layout, loads
    every split: sizes, float32 [0, 1] images of the right shape, exact test pixels and labels."""
    forbid_downloads(monkeypatch)
    side, sizes, test_images, test_labels, train_labels = _fake_on_disk(option, tmp_path / "files")
    cfg = make_cfg(f"data={option}", f"data.data_dir={tmp_path / 'files'}")
    dm = RunContext.from_config(cfg).datamodule
    assert dm.name == option
    split = {s: dm.tensor(s) for s in ("train", "val", "test")}
    for s, (images, labels) in split.items():
        assert images.shape == (sizes[s], 3, side, side) and images.dtype == torch.float32, s
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert labels.dtype == torch.int64 and labels.shape == (sizes[s],)
    assert torch.allclose(split["test"][0], test_images, atol=1e-6)
    assert split["test"][1].tolist() == test_labels
    assert sorted(split["train"][1].tolist() + split["val"][1].tolist()) == sorted(train_labels)
    images, labels = next(iter(dm.train_dataloader()))  # through the config's loader workers
    assert images.shape[1:] == (3, side, side) and labels.dtype == torch.int64


@pytest.mark.parametrize("option", options("dictionary"))
def test_dictionary_options_instantiate(make_cfg, option) -> None:
    from warplca.tasks.stage_dictionary import build_dictionary

    ctx = RunContext.from_config(make_cfg(f"dictionary={option}"))
    d = build_dictionary(ctx)
    assert isinstance(d, ConvDictionary) and d.in_channels == 3
    assert torch.allclose(d.weight.flatten(1).norm(dim=1), torch.ones(d.n_atoms), atol=1e-5)


@pytest.mark.parametrize("option", options("lca"))
def test_lca_options_instantiate(make_cfg, option) -> None:
    cfg = make_cfg(f"lca={option}")
    assert set(cfg.lca) == set(SETTINGS)  # every solver setting, declared once by LCA.__init__
    ctx = RunContext.from_config(cfg)
    lca = ctx.lca(ConvDictionary(8, 3, 5, 2))
    assert isinstance(lca, LCA) and lca.threshold.name == option and lca.lam == cfg.lca.lam
    res = lca(torch.rand(2, 3, 16, 16) - 0.5, iters=5)
    assert torch.isfinite(res.energy).all()


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate(make_cfg, option) -> None:
    cfg = make_cfg(f"trainer={option}", "logger=csv")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    trainer = RunContext.from_config(cfg).trainer("dictionary")
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_epochs == 1  # the stage default (model.dictionary.trainer) applies
    if option == "ddp_cpu":
        assert trainer.num_devices == 2
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert trainer.strategy._start_method == "spawn"
        assert trainer.strategy.process_group_backend == "gloo"


def test_trainer_precedence(make_cfg, tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    ctx = RunContext.from_config(make_cfg("model.dictionary.trainer.max_epochs=7"))
    assert ctx.trainer_kwargs("dictionary")["max_epochs"] == 7
    ctx = RunContext.from_config(make_cfg("model.dictionary.trainer.max_epochs=7", "trainer.max_epochs=2"))
    assert ctx.trainer_kwargs("dictionary")["max_epochs"] == 2
    assert ctx.trainer_kwargs("dictionary", max_epochs=3)["max_epochs"] == 3
    # a stage's own defaults (the fine-tune's epochs) beat model.<stage>.trainer, not the trainer group
    assert ctx.trainer_kwargs("dictionary", defaults={"max_epochs": 5})["max_epochs"] == 2
    ctx7 = RunContext.from_config(make_cfg("model.dictionary.trainer.max_epochs=7",
                                           "+model.dictionary.trainer.gradient_clip_val=0.5"))
    assert ctx7.trainer_kwargs("dictionary", defaults={"max_epochs": 5}) | {"_target_": None} == {
        **ctx7.trainer_kwargs("dictionary"), "max_epochs": 5, "_target_": None}
    assert ctx7.trainer_kwargs("dictionary")["gradient_clip_val"] == 0.5
    named = ctx.trainer("dictionary", name="dictionary_again")
    assert [Path(c.dirpath) for c in named.callbacks if isinstance(c, ModelCheckpoint)] == [
        ctx.run_dir / "checkpoints" / "dictionary_again"]
    trainer = ctx.trainer("dictionary")
    ckpts = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(ckpts) == 1 and Path(ckpts[0].dirpath) == ctx.run_dir / "checkpoints" / "dictionary"
    assert ckpts[0].save_last
    assert Path(trainer.default_root_dir) == ctx.run_dir


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(make_cfg, option, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ctx = RunContext.from_config(make_cfg(f"logger={option}"))
    loggers = ctx.loggers("dictionary")
    names = {type(lg).__name__ for lg in loggers}
    expected = {"csv": {"CSVLogger"}, "tensorboard": {"TensorBoardLogger"}, "wandb": {"WandbLogger"},
                "many": {"CSVLogger", "TensorBoardLogger", "WandbLogger"}, "none": set()}[option]
    assert names == expected
    for lg in loggers:
        if type(lg).__name__ in ("CSVLogger", "TensorBoardLogger"):
            assert str(lg.version) == "dictionary"  # one sub-directory per stage
        lg.finalize("success")
    ctx.finish_loggers()
    raw = OmegaConf.load(CONF / "logger" / f"{option}.yaml")
    if "wandb" in raw:
        assert "mode" not in raw.wandb and "offline" not in raw.wandb  # wandb reads WANDB_MODE


@pytest.mark.parametrize("override", ["logger=none", "~logger"])
def test_no_logger(make_cfg, override) -> None:
    ctx = RunContext.from_config(make_cfg(override))
    assert ctx.loggers("dictionary") == []
    trainer = ctx.trainer("dictionary")
    assert trainer.logger is None
    assert not any(type(c).__name__ == "LearningRateMonitor" for c in trainer.callbacks)


def test_stage_code_can_switch_loggers_off(make_cfg) -> None:
    trainer = RunContext.from_config(make_cfg("logger=many")).trainer("dictionary", logger=False)
    assert trainer.logger is None
    assert not any(type(c).__name__ == "LearningRateMonitor" for c in trainer.callbacks)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_options(make_cfg, option) -> None:
    trainer = RunContext.from_config(make_cfg(f"callbacks={option}")).trainer("dictionary")
    from pytorch_lightning.callbacks import ModelCheckpoint

    assert sum(isinstance(c, ModelCheckpoint) for c in trainer.callbacks) == 1


@pytest.mark.parametrize("option", [o for o in options("debug") if o != "default"])
def test_debug_options_force_cpu_no_loggers(make_cfg, option) -> None:
    cfg = make_cfg("trainer=ddp_cpu", "logger=many", f"debug={option}")
    assert cfg.logger is None and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    assert cfg.trainer.strategy == "auto" and cfg.data.num_workers == 0
    trainer = RunContext.from_config(cfg).trainer("dictionary")
    assert trainer.num_devices == 1 and trainer.logger is None


def test_experiment_quickstart(make_cfg) -> None:
    cfg = make_cfg("experiment=quickstart", tiny=False)
    assert cfg.task_name == "quickstart" and list(cfg.stages) == ["dictionary", "targets", "warp", "report"]
    assert cfg.data._target_.endswith("NaturalDataModule") and cfg.dictionary.n_atoms == 64


# -- bad overrides ----------------------------------------------------------------------------------
def test_unknown_dataset_names_the_group(make_cfg) -> None:
    with pytest.raises(HydraException, match="data/nope"):
        make_cfg("data=nope")


def test_negative_lambda_names_the_key(make_cfg) -> None:
    cfg = make_cfg("lca.lam=-1")
    with pytest.raises(ValueError, match=r"lca\.lam=-1"):
        validate_train_config(cfg)
    with pytest.raises(ValueError, match=r"lca\.lam=-1"):
        train(cfg)  # fails before any training
    assert not (Path(cfg.paths.output_dir) / "dictionary.pt").exists()


def test_bad_tau_and_unknown_lca_key(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"lca\.tau=-3: must be a finite number > 0 or auto"):
        validate_train_config(make_cfg("lca.tau=-3"))
    with pytest.raises(ValueError, match="lca.lamda: unknown key for LCA.*did you mean lca.lam"):
        validate_train_config(make_cfg("+lca.lamda=1"))


def test_missing_cifar_directory_is_named(make_cfg, tmp_path) -> None:
    from warplca.data import DatasetNotFoundError

    missing = tmp_path / "no_cifar_here"
    cfg = make_cfg("data=cifar10", f"paths.data_dir={missing}")
    with pytest.raises(DatasetNotFoundError, match="no_cifar_here"):
        train(cfg)


def test_missing_dictionary_path(make_cfg, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dictionary_path"):
        validate_train_config(make_cfg(f"dictionary_path={tmp_path / 'nope.pt'}"))


# -- stages and the run context ---------------------------------------------------------------------
def test_stage_names() -> None:
    assert STAGE_ORDER == ("dictionary", "targets", "warp", "ablation", "learning_curve", "levers",
                           "scaling", "classify", "report")
    assert resolve_stages(["report", "learning_curve", "ablation"]) == ["ablation", "learning_curve",
                                                                       "report"]
    assert resolve_stages(["report", "dictionary", "report"]) == ["dictionary", "report"]
    assert resolve_stages("[warp,dictionary]") == ["dictionary", "warp"]
    with pytest.raises(ValueError, match="valid stages") as info:
        resolve_stages(["dictionary", "bogus"])
    assert "bogus" in str(info.value) and "targets" in str(info.value)


def test_every_stage_module_is_registered() -> None:
    for name, stage in STAGES.items():
        assert stage.module.__name__ == f"warplca.tasks.stage_{name}" and callable(stage.module.run), name
        assert all(STAGE_ORDER.index(up) < STAGE_ORDER.index(name) for up in stage.reads), name
    assert STAGES["dictionary"].artifact == "dictionary.pt" and STAGES["warp"].artifact == "warp_lca.pt"
    assert parse_stages(" [warp, report ,] ") == ["warp", "report"] and parse_stages(None) == []


def test_skip_rules(make_cfg, tmp_path) -> None:
    ctx = RunContext.from_config(make_cfg())
    assert stage_done(ctx, "dictionary") is None
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    ctx.artifact("dictionary.pt").write_bytes(b"x")
    assert "dictionary.pt exists" in stage_done(ctx, "dictionary")
    assert stage_done(RunContext.from_config(make_cfg("force=true")), "dictionary") is None
    other = tmp_path / "given.pt"
    other.write_bytes(b"x")
    msg = stage_done(RunContext.from_config(make_cfg(f"dictionary_path={other}", "force=true")), "dictionary")
    assert msg is not None and "dictionary_path" in msg


def test_log_metrics_merges_atomically(make_cfg) -> None:
    ctx = RunContext.from_config(make_cfg())
    ctx.log_metrics("dictionary", {"test/psnr": torch.tensor(20.5), "n": 3})
    ctx.log_metrics("warp", {"mse": 0.1})
    ctx.log_metrics("dictionary", {"test/ssim": 0.7})
    data = json.loads((ctx.run_dir / "metrics.json").read_text())
    assert data == {"dictionary": {"test/psnr": 20.5, "n": 3, "test/ssim": 0.7}, "warp": {"mse": 0.1}}
    assert not list(ctx.run_dir.glob(".metrics.*"))
    flat = flatten_metrics(data)
    assert flat["dictionary/test/psnr"] == 20.5
    assert get_metric_value(flat, "warp/mse") == 0.1
    assert get_metric_value(flat, None) is None
    with pytest.raises(KeyError, match="available"):
        get_metric_value(flat, "warp/nope")


def test_missing_dictionary_suggests_the_stage(make_cfg) -> None:
    ctx = RunContext.from_config(make_cfg())
    with pytest.raises(FileNotFoundError, match=r"dictionary\.pt.*stages=\[dictionary"):
        ctx.dictionary()


def test_dictionary_and_normalization_round_trip(make_cfg) -> None:
    from warplca.data import Normalization

    ctx = RunContext.from_config(make_cfg())
    assert ctx.normalization() == ctx.datamodule.normalization  # no dictionary yet: the data's
    d = ConvDictionary(8, 3, 5, 2, seed=3)
    norm = Normalization(mean=(0.1, 0.2, 0.3), scale=2.0)
    d.save(ctx.artifact("dictionary.pt"), normalization=norm.to_dict())
    fresh = RunContext.from_config(ctx.cfg)
    assert torch.equal(fresh.dictionary().weight, d.weight)
    assert fresh.normalization() == norm
    assert fresh.lca().lam == ctx.cfg.lca.lam
