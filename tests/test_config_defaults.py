"""The shipped YAML is the only source of defaults: code that fills a missing setting reads the YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from warplca.config_defaults import (
    config_dir,
    fill_missing,
    option_defaults,
    primary_defaults,
    primary_option,
)


def _yaml(relative: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / relative), resolve=False)


def _ctx(cfg):
    from warplca.tasks.context import RunContext

    return RunContext.from_config(cfg)


def _without(cfg, *keys: str):
    with open_dict(cfg):
        for key in keys:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            node.pop(leaf)
    return cfg


def test_helper_reads_the_files_and_the_primary_choices() -> None:
    assert primary_option("targets") == ("targets", "default")
    assert primary_option("model.warp") == ("model", "warp_regression")
    assert primary_option("eval", "eval") == ("eval", "convergence")
    assert primary_defaults("targets") == _yaml("targets/default.yaml")
    conv = option_defaults("eval", "convergence")  # its defaults list: common, then _self_
    assert conv == {**_yaml("eval/common.yaml"), **{k: v for k, v in _yaml("eval/convergence.yaml").items()
                                                    if k != "defaults"}}
    conv["budgets"].append(-1)  # a fresh copy every time
    assert -1 not in option_defaults("eval", "convergence")["budgets"]
    assert fill_missing({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}
    with pytest.raises(KeyError, match="no option"):
        primary_option("nowhere")


def test_no_python_copies_of_the_defaults_remain() -> None:
    from warplca.tasks import evaluate, stage_classify, stage_targets, study

    for module in (stage_targets, study, evaluate):
        assert not hasattr(module, "DEFAULTS"), module.__name__
    assert not hasattr(stage_classify, "_DEFAULTS")


def test_targets_settings_without_a_targets_node_are_the_yaml(make_cfg) -> None:
    from warplca.tasks import stage_targets

    yaml = _yaml("targets/default.yaml")
    got = stage_targets.settings(_ctx(_without(make_cfg(), "targets")))
    assert got == yaml and got["iters"] == 600 and got["solver"] == "continuation"
    # a node that leaves keys out (or null) gets them from the YAML, not from code
    partial = stage_targets.settings(_ctx(_without(make_cfg("targets.solver=null"), "targets.iters")))
    assert partial["iters"] == yaml["iters"] and partial["solver"] == yaml["solver"]
    assert stage_targets.settings(_ctx(make_cfg("targets.iters=7")))["iters"] == 7


def test_study_and_classify_settings_without_nodes_are_the_yaml(make_cfg) -> None:
    from warplca.tasks.stage_classify import STAGE_KEYS, settings
    from warplca.tasks.study import study_settings

    assert study_settings(_ctx(_without(make_cfg(), "study"))) == _yaml("study/default.yaml")
    shipped = _yaml("model/noisy_classification.yaml")
    stage, module = settings(_ctx(_without(make_cfg(), "model.classify")))
    for key in STAGE_KEYS:
        if key != "trainer":
            assert stage[key] == shipped[key], key
    assert module == {"_target_": shipped["_target_"]}


def test_warp_settings_fill_from_the_yaml_and_refuse_pipeline_keys(make_cfg) -> None:
    from warplca.tasks.predictor_fit import loss_config, warp_data_settings

    shipped = _yaml("model/warp_regression.yaml")
    cfg = _without(make_cfg(), "model.warp.batch_size", "model.warp._target_")
    node, data = warp_data_settings(_ctx(cfg))
    assert data["batch_size"] == shipped["batch_size"] and node["_target_"] == shipped["_target_"]
    assert loss_config(_ctx(_without(make_cfg(), "loss"))) == {"loss": "laplacian", "gamma": 3.0}
    assert loss_config(_ctx(make_cfg("loss=mse"))) == {"loss": "mse", "gamma": None}
    with pytest.raises(ValueError, match=r"model\.warp\.loss: the loss is chosen with the top-level loss"):
        warp_data_settings(_ctx(make_cfg("+model.warp.loss=mse")))


def test_timing_settings_default_to_the_eval_yaml() -> None:
    from warplca.evaluation.convergence import TimingSettings

    timing = _yaml("eval/convergence.yaml")["convergence"]["timing"]
    assert TimingSettings() == TimingSettings(**timing)
    assert TimingSettings(images=2).repeats == timing["repeats"]


def test_eval_settings_are_the_yaml_under_the_config(make_cfg, tmp_path: Path) -> None:
    from warplca.evaluation.experiments import eval_settings

    base = option_defaults("eval", "convergence")
    base.pop("modes")
    assert eval_settings(None) == base  # the report stage of a train config without an eval node
    assert eval_settings(make_cfg("+eval.n_images=8"))["n_images"] == 8
    cfg = make_cfg("eval=denoise", tiny=False, config_name="eval", output_dir=tmp_path / "ev")
    composed = eval_settings(cfg)
    assert composed["denoise"] == _yaml("eval/denoise.yaml")["denoise"]
    assert composed["convergence"] == base["convergence"]
    # a mode the eval option does not configure gets its own option's section, interpolations resolved
    cfg = make_cfg("eval=convergence", "eval.modes=[ood]", "seed=5", tiny=False, config_name="eval",
                   output_dir=tmp_path / "ev2")
    ood = eval_settings(cfg)["ood"]
    assert ood["n_images"] == _yaml("eval/ood.yaml")["ood"]["n_images"]
    assert ood["sources"][0]["data"]["seed"] == 5
