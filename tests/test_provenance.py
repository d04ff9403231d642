"""Artifacts know what made them: each stage records the settings its artifact depends on, and a run refuses
to reuse an artifact the config now describes differently. Also: metrics.json is strict JSON."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_OVERRIDES

from warplca import WarpLCA
from warplca.config import compose_config
from warplca.data.target_cache import TargetCacheMismatchError
from warplca.serialization import merge_metrics, read_metrics
from warplca.tasks.context import RunContext
from warplca.tasks.provenance import ProvenanceMismatchError, is_volatile, read_record, record_file
from warplca.tasks.stages import STAGE_ORDER, depends_on
from warplca.tasks.train import train
from warplca.tasks.utils import is_user_error

#: the main job's stages on tiny settings (seconds on a CPU)
PIPELINE = (*TINY_OVERRIDES, "stages=[dictionary,targets,warp,report]", "data.n_val=16", "data.n_test=16",
            "targets.iters=10", "targets.chunk_size=32", "targets.batch_size=32", "targets.solver=cold",
            "model.warp.epochs=1", "model.warp.eval_iters=[0,3]", "model.warp.batch_size=32",
            "trainer.enable_progress_bar=false", "progress=false", "print_metrics=false",
            "eval.n_images=4", "eval.convergence.timing.enabled=false",
            "eval.convergence.examples.images=2", "logger=csv")
ARTIFACTS = ("dictionary.pt", "targets/COMPLETE", "warp_lca.pt", "report.md")


def _raise(name: str) -> None:
    raise ValueError(f"not JSON: {name}")


def _stamps(run: Path) -> dict[str, int]:
    return {name: (run / name).stat().st_mtime_ns for name in ARTIFACTS}


def _train(run: Path, *overrides: str) -> dict[str, float]:
    return train(compose_config([*PIPELINE, *overrides], output_dir=run))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory in which the tiny pipeline ran once (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _train(run)
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`finished` at a pinned path."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


# -- what each stage depends on -----------------------------------------------------------------------
def test_dependencies_are_transitive_and_leave_out_what_changes_no_artifact(
        make_cfg: Callable[..., Any]) -> None:
    cfg = make_cfg("eval.n_images=4")
    deps = {name: depends_on(cfg, name) for name in STAGE_ORDER}
    dictionary, targets, warp, report = deps["dictionary"], deps["targets"], deps["warp"], deps["report"]
    assert {"seed", "data.n_train", "norm.kind", "dictionary.n_atoms", "lca.lam", "model.dictionary.lr",
            "trainer.max_epochs"} <= set(dictionary)
    assert "lca.iters" not in dictionary and "lca.iters" not in targets  # both use their own iteration counts
    assert dictionary.items() <= targets.items() and "targets.iters" in targets
    assert targets.items() <= warp.items() and {"lca.iters", "predictor.width", "loss.name",
                                                "model.warp.lr"} <= set(warp)
    assert warp.items() <= report.items() and report["eval.n_images"] == 4
    assert warp.items() <= deps["classify"].items() and "model.classify.lr" in deps["classify"]
    assert {"study.ablation.losses", "targets.iters"} <= set(deps["ablation"])
    assert not any(k.startswith("study.levers") for k in deps["ablation"])
    for key in {k for d in deps.values() for k in d}:
        assert not key.startswith(("logger", "callbacks", "paths", "hydra", "trainer.log_every_n_steps",
                                   "model.dictionary.trainer.enable_progress_bar")), key
        assert key.rsplit(".", 1)[-1] not in {"num_workers", "pin_memory"}, key
    assert "data.batch_size" not in report and "targets.batch_size" not in report
    assert is_volatile("model.warp.trainer.log_every_n_steps")
    assert not is_volatile("model.warp.trainer.max_epochs")


def test_an_artifact_given_by_path_stands_for_its_settings(make_cfg: Callable[..., Any],
                                                           tmp_path: Path) -> None:
    given = tmp_path / "given.pt"
    warp = depends_on(make_cfg(f"dictionary_path={given}"), "warp")
    assert warp["dictionary_path"] == str(given) and "lca.lam" in warp
    assert not any(k.startswith(("dictionary.", "model.dictionary.")) for k in warp)
    report = depends_on(make_cfg(f"warp_path={given}", "lca.lam=7"), "report")
    assert report["warp_path"] == str(given) and "lca.lam" not in report


# -- reusing artifacts -----------------------------------------------------------------------------------
def test_a_run_records_what_made_each_artifact(finished: Path) -> None:
    for stage in ("dictionary", "targets", "warp", "report"):
        recorded = read_record(finished, stage)
        assert recorded is not None and recorded["lca.lam"] == 0.2, stage
        json.loads(record_file(finished, stage).read_text(), parse_constant=_raise)
    assert "lca.iters" in read_record(finished, "warp") and "eval.n_images" in read_record(finished, "report")


def test_another_setting_is_refused_naming_the_key_and_the_way_out(run: Path) -> None:
    before = _stamps(run)
    with pytest.raises(ProvenanceMismatchError) as info:
        _train(run, "lca.lam=0.3")
    err = info.value
    assert is_user_error(err)  # printed in a few lines, without a traceback, by the task wrapper
    assert set(err.stale) == {"dictionary", "targets", "warp", "report"}
    assert err.stale["warp"]["lca.lam"] == (0.2, 0.3) and err.stale["report"]["lca.lam"] == (0.2, 0.3)
    text = str(err)
    assert "warp (warp_lca.pt):\n    lca.lam: 0.2 -> 0.3" in text and "report (report.md):" in text
    assert "force=true stages=[dictionary,targets,warp,report]" in text and "run_dir=" in text
    # the report alone still reads the bundle, made with the old λ
    with pytest.raises(ProvenanceMismatchError) as info:
        _train(run, "stages=[report]", "lca.lam=0.3")
    assert set(info.value.stale) == {"dictionary", "targets", "warp", "report"}
    with pytest.raises(ProvenanceMismatchError, match=r"model\.warp\.lr: 0\.003 -> 0\.01") as info:
        _train(run, "model.warp.lr=0.01")
    assert set(info.value.stale) == {"warp", "report"}  # the dictionary and the targets are still good
    assert _stamps(run) == before


def test_loading_and_logging_settings_are_not_refused(run: Path) -> None:
    before = _stamps(run)
    metrics = _train(run, "data.num_workers=1", "logger=none", "trainer.log_every_n_steps=1",
                     "data.batch_size=16", "targets.num_workers=1")
    assert _stamps(run) == before  # every stage skipped
    assert metrics["warp/predictor_params"] > 0  # its metrics come from metrics.json


def test_force_redoes_and_records_the_new_settings(run: Path) -> None:
    before = _stamps(run)
    _train(run, "lca.lam=0.3", "force=true")
    after = _stamps(run)
    assert all(after[name] != before[name] for name in ARTIFACTS)
    assert WarpLCA.load(run / "warp_lca.pt").lca.settings()["lam"] == 0.3
    assert all(read_record(run, stage)["lca.lam"] == 0.3 for stage in ("dictionary", "targets", "warp",
                                                                        "report"))
    _train(run, "lca.lam=0.3")  # the same settings again: reused as they are
    assert _stamps(run) == after


def test_a_run_without_records_is_trusted_with_a_warning_then_recorded(
        finished: Path, run: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(run / "provenance")
    before = _stamps(run)
    with caplog.at_level(logging.WARNING, logger="warplca.tasks.provenance"):
        _train(run)
    warned = [r.getMessage() for r in caplog.records if "no provenance record" in r.getMessage()]
    assert len(warned) == 4, warned
    assert any(m.startswith("warp: warp_lca.pt has no provenance record") for m in warned)
    assert _stamps(run) == before
    assert all(read_record(run, stage) == read_record(finished, stage) for stage in STAGE_ORDER[:3])
    with pytest.raises(ProvenanceMismatchError, match=r"lca\.lam: 0\.2 -> 0\.3"):
        _train(run, "lca.lam=0.3")
    # without records, another λ is still refused by the target cache's manifest, and nothing is recorded
    shutil.rmtree(run / "provenance")
    with pytest.raises(TargetCacheMismatchError, match="lam"):
        _train(run, "lca.lam=0.3")
    assert not (run / "provenance").exists()


# -- metrics.json ------------------------------------------------------------------------------------------
def test_metrics_json_is_strict_json(make_cfg: Callable[..., Any]) -> None:
    ctx = RunContext.from_config(make_cfg())
    ctx.log_metrics("report", {"convergence/iterations_to_match": math.nan, "inf": torch.tensor(math.inf),
                               "ratio": torch.tensor(0.5), "curve": torch.tensor([1.0, math.nan])})
    text = (ctx.run_dir / "metrics.json").read_text()
    data = json.loads(text, parse_constant=_raise)
    assert data == {"report": {"convergence/iterations_to_match": None, "inf": None, "ratio": 0.5,
                               "curve": [1.0, None]}}
    assert read_metrics(ctx.run_dir) == data == read_metrics(ctx.run_dir / "metrics.json")


def test_a_metrics_file_with_nan_from_an_older_version_is_rewritten_strictly(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"warp": {"a": NaN, "b": 1.0}}')
    merge_metrics(tmp_path, {"c": 2}, section="warp")
    data = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=_raise)
    assert data == {"warp": {"a": None, "b": 1.0, "c": 2}}
