"""Every setting is declared once, in the signature that uses it: the Python API and the command line
build the same objects, a run's saved config records every setting, and no code keeps a private default."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from warplca import LCA, ConvDictionary, WarpCNN
from warplca.config import TRAIN, bases, default_config_dir, settings_reference
from warplca.data import NaturalDataModule, Normalization
from warplca.frontends import LCAFrontEnd, WarpLCAFrontEnd
from warplca.modules import DictionaryLearning, NoisyClassification, WarpRegression
from warplca.settings import declared, defaults
from warplca.tasks.predictor_fit import build_module, build_predictor
from warplca.tasks.stage_classify import ClassifyStageSettings
from warplca.tasks.stage_classify import settings as classify_settings

REPO = Path(__file__).resolve().parents[1]
NORM = Normalization(mean=(0.5, 0.5, 0.5), kind="image_mean")


def _node(cfg, key: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
    node.pop("trainer", None)
    return node


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    from warplca.config import compose_config

    return compose_config([], output_dir=tmp_path_factory.mktemp("run"))


def test_lca_and_dictionary_from_bare_constructors_equal_the_command_line(cfg) -> None:
    d = instantiate(cfg.dictionary, in_channels=3)
    bare = ConvDictionary()
    assert d.config() == bare.config() and torch.equal(d.weight, bare.weight)
    assert LCA(bare).settings() == LCA(bare, **OmegaConf.to_container(cfg.lca)).settings()
    assert set(LCA(bare).settings()) == set(cfg.lca)  # the run's config records every solver setting


def test_modules_from_bare_constructors_equal_the_command_line(cfg) -> None:
    from warplca.tasks.context import RunContext

    d, lca = ConvDictionary(), LCA(ConvDictionary())
    node = _node(cfg, "model.dictionary")
    from_cli = instantiate(node, _partial_=True)(dictionary=d, lca_settings=lca.settings(),
                                                 normalization=NORM)
    bare = DictionaryLearning(d, lca.settings(), NORM)
    assert dict(from_cli.hparams) == dict(bare.hparams)

    ctx = RunContext.from_config(cfg)
    module, _ = build_module(ctx, d, lca, NORM)
    bare = WarpRegression(WarpCNN(3, 64, 2), d, lca.settings(), NORM)
    assert dict(module.hparams) == dict(bare.hparams)
    assert build_predictor(ctx, d).config() == WarpCNN(3, 64, 2).config()


def test_classifier_and_front_ends_equal_the_command_line(cfg) -> None:
    from warplca.tasks.context import RunContext

    d = ConvDictionary()
    stage, module_node = classify_settings(RunContext.from_config(cfg))
    declared_stage = json.loads(json.dumps(dataclasses.asdict(ClassifyStageSettings())))
    assert {k: v for k, v in stage.items() if k != "conditions"} == declared_stage
    fe = LCAFrontEnd(d, normalization=NORM)
    from_cli = instantiate(module_node, _partial_=True)(frontend=fe, num_classes=10, image_size=32)
    assert dict(from_cli.hparams) == dict(NoisyClassification(fe).hparams)
    assert fe.iters == stage["lca_iters_cold"] and fe.lca_settings == {
        k: v for k, v in LCA(d).settings().items() if k != "iters"}
    assert defaults(WarpLCAFrontEnd)["iters"] == stage["lca_iters_warm"]


def test_datamodule_from_bare_constructor_equals_the_command_line(cfg) -> None:
    node = _node(cfg, "data")
    assert node == {"_target_": "warplca.data.natural.NaturalDataModule", **defaults(NaturalDataModule)}


def test_every_declared_setting_is_in_the_composed_config(cfg) -> None:
    """No setting needs ``+`` to be overridden, and a run's .hydra/config.yaml records each one."""
    for key, spec in TRAIN.items():
        node = OmegaConf.select(cfg, key) if key else cfg
        decls = ([spec.target] if spec.target is not None else []) + list(spec.stage)
        for decl in decls:
            for name, s in declared(decl).items():
                if name not in spec.provided and not s.required:
                    assert name in node, f"{key or 'top level'}.{name} is declared but not in the config"
    for key in ("eval.n_images", "print_metrics", "progress", "lca.backend", "lca.check_every"):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>" or key.startswith("eval."), key


def test_presets_hold_only_what_differs_from_their_base() -> None:
    found = {(g, n): node for g, n, node in bases()}
    for path in sorted(default_config_dir().glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        base_names = [e for e in data.get("defaults", []) if isinstance(e, str) and e != "_self_"]
        if not base_names or (path.parent.name, base_names[0]) not in found:
            continue
        base = found[(path.parent.name, base_names[0])]
        same = [k for k, v in data.items() if k != "defaults" and base.get(k) == v and "${" not in str(v)]
        assert not same, f"{path.relative_to(REPO)} repeats its base's values for {same}"


def test_settings_reference_is_current() -> None:
    """Generated in a fresh process: toy thresholds or evaluations registered by other tests would list
    their names among the choices."""
    out = subprocess.run([sys.executable, "-m", "warplca.config"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.startswith(settings_reference().split("\n## ")[0])
    assert (REPO / "docs" / "settings.md").read_text() == out, (
        "docs/settings.md is stale: python -m warplca.config > docs/settings.md")


class _Fallbacks(ast.NodeVisitor):
    """Calls ``<cfg>.get("<name>", <literal>)`` on a config (``cfg``, ``ctx.cfg``, …) whose name is a declared
    setting: a second default."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.found = names, []

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        on_cfg = isinstance(f, ast.Attribute) and (
            (isinstance(f.value, ast.Name) and f.value.id == "cfg")
            or (isinstance(f.value, ast.Attribute) and f.value.attr == "cfg"))
        if (on_cfg and f.attr == "get" and len(node.args) == 2
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in self.names
                and isinstance(node.args[1], ast.Constant) and node.args[1].value is not None):
            self.found.append(f"{node.args[0].value}={node.args[1].value!r} (line {node.lineno})")
        self.generic_visit(node)


def test_no_literal_fallbacks_for_declared_settings() -> None:
    """``cfg.get("progress", True)`` would be a second default of a declared setting (a third when it
    differs); the composed config always holds the declared one."""
    from warplca.evaluation.experiments import EvalRunSettings, EvalSettings
    from warplca.tasks.context import RunSettings

    names = {n for decl in (RunSettings, EvalRunSettings, EvalSettings) for n in declared(decl)}
    bad = {}
    for path in sorted((REPO / "src" / "warplca").rglob("*.py")):
        visitor = _Fallbacks(names)
        visitor.visit(ast.parse(path.read_text()))
        if visitor.found:
            bad[str(path.relative_to(REPO))] = visitor.found
    assert not bad, bad


def test_a_scan_for_fallbacks_can_fail() -> None:
    visitor = _Fallbacks({"progress"})
    visitor.visit(ast.parse("cfg.get('progress', True)\ncfg.get('progress')\ncfg.get('other', 1)"))
    assert visitor.found == ["progress=True (line 1)"]
