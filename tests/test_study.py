"""The warm-start study stages (ablation, learning curve) through the Hydra config, on tiny settings."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from warplca import ConvDictionary, WarpLCA
from warplca.data import NaturalDataModule


def _overrides(dictionary: Path, *extra: str) -> list[str]:
    return ["stages=[targets,warp,ablation,learning_curve,report]", f"dictionary_path={dictionary}",
            "targets.iters=10", "targets.chunk_size=32", "targets.batch_size=32", "targets.limit=null",
            "targets.solver=cold", "lca.iters=20", "predictor=small",
            "data.n_train=64", "data.n_val=32", "data.n_test=16",
            "model.warp.epochs=1", "model.warp.finetune.epochs=0", "model.warp.eval_iters=[0,3]",
            "model.warp.batch_size=32",
            "trainer.enable_progress_bar=false", "progress=false",
            "study.n_images=8", "study.budgets=[3]", "study.ablation.losses=[mse,l1]",
            "study.learning_curve.sizes=[16,64,999]", "study.learning_curve.epochs=[1,2]",
            "eval.n_images=8", "eval.convergence.timing.enabled=false", *extra]


@pytest.fixture
def dictionary_path(tmp_path: Path) -> Path:
    dm = NaturalDataModule(n_train=64, n_val=32, n_test=16)
    dictionary = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=0)
    return dictionary.save(tmp_path / "dictionary.pt", normalization=dm.normalization.to_dict())


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_ablation_and_learning_curve_stages(tmp_path: Path, dictionary_path: Path) -> None:
    from warplca.config import compose_config
    from warplca.tasks.train import train

    run = tmp_path / "run"
    metrics = train(compose_config(_overrides(dictionary_path), output_dir=run))

    ablation = _rows(run / "ablation.csv")
    assert [(r["loss"], r["input"]) for r in ablation] == [
        ("mse", "image"), ("mse", "image+drive"), ("l1", "image"), ("l1", "image+drive")]
    for row in ablation:
        k = float(row["iterations_to_match"])
        assert math.isnan(k) or 0 <= k <= 20
        assert 0 < float(row["energy@20"]) <= float(row["energy@0"]) + 1e-6  # LCA lowers the energy
    drive = {r["input"]: int(r["params"]) for r in ablation}
    assert drive["image+drive"] > drive["image"]  # the drive really is an extra input

    curve = _rows(run / "learning_curve.csv")
    assert sorted({int(r["train_size"]) for r in curve}) == [16, 64]  # 999 clipped to the 64 cached targets
    assert len(curve) == 4
    assert not (run / "ablation.partial.json").exists() and not (run / "learning_curve.partial.json").exists()
    for name in ("ablation", "learning_curve"):
        assert (run / f"{name}.png").stat().st_size > 0
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "## Ablation: loss × input" in report and "## Learning curve" in report
    assert metrics["ablation/mse_image/iterations_to_match"] == pytest.approx(
        float(ablation[0]["iterations_to_match"]), nan_ok=True)

    # the cold reference is plain LCA on the first 8 val images: the API gives the same energy
    model = WarpLCA.load(run / "warp_lca.pt")
    dm = NaturalDataModule(n_train=64, n_val=32, n_test=16)
    images, _ = dm.tensor("val", 8)
    with torch.no_grad():
        cold = model(model.preprocess(images), iters=20, warm=False, trace=True).trace["energy"][-1].mean()
    assert metrics["ablation/cold/energy@T"] == pytest.approx(float(cold), rel=1e-5)

    # done stages are skipped: the same command changes nothing
    stamp = (run / "ablation.csv").stat().st_mtime_ns
    train(compose_config(_overrides(dictionary_path), output_dir=run))
    assert (run / "ablation.csv").stat().st_mtime_ns == stamp


def test_interrupted_study_resumes_finished_variants(tmp_path: Path, dictionary_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from warplca.config import compose_config
    from warplca.tasks import predictor_fit, study
    from warplca.tasks.train import train

    run = tmp_path / "run"
    ov = _overrides(dictionary_path, "stages=[targets,warp,ablation]", "study.ablation.inputs=[image]")
    calls: list[int] = []
    real_fit = predictor_fit.fit_quietly

    def crash_on_second(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real_fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(study, "fit_quietly", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(ov, output_dir=run))
    assert (run / "ablation.partial.json").is_file() and not (run / "ablation.csv").exists()

    calls.clear()
    monkeypatch.setattr(study, "fit_quietly", lambda *a, **k: (calls.append(1), real_fit(*a, **k))[1])
    train(compose_config(ov, output_dir=run))
    assert len(calls) == 1  # only the unfinished variant (l1) was trained again
    assert [r["loss"] for r in _rows(run / "ablation.csv")] == ["mse", "l1"]


@pytest.mark.parametrize(("override", "key"), [
    ("study.ablation.losses=[mse,hinge]", "study.ablation.losses"),
    ("study.ablation.inputs=[pixels]", "study.ablation.inputs"),
    ("+study.bogus=1", "study"),
    ("study.learning_curve.sizes=[0,64]", "study.learning_curve.sizes"),
    ("study.split=holdout", "study.split"),
])
def test_bad_study_settings_are_refused(tmp_path: Path, dictionary_path: Path, override: str,
                                        key: str) -> None:
    from warplca.config import check_train_config, compose_config

    problems = check_train_config(compose_config(_overrides(dictionary_path, override), output_dir=tmp_path))
    assert any(k.startswith(key) for k, _ in problems), problems


def test_symmetries_are_the_seven_non_identity_ones() -> None:
    from warplca.tasks.stage_levers import symmetry

    x = torch.arange(9.0).view(1, 1, 3, 3)
    seen = {tuple(symmetry(x, i).flatten().tolist()) for i in range(1, 8)}
    assert len(seen) == 7 and tuple(x.flatten().tolist()) not in seen


def test_levers_stage_scores_each_lever_against_the_baseline(tmp_path: Path, dictionary_path: Path) -> None:
    """Predictor variants, augmentation (twice the training pairs), self-distillation and the energy
    fine-tune (from the baseline's weights), on val."""
    from warplca.config import compose_config
    from warplca.tasks import stage_levers
    from warplca.tasks.train import train

    overrides = _overrides(dictionary_path, "stages=[targets,warp,levers,report]",
                           "study.levers.predictors.small={width: 48}", "~study.levers.predictors.kernel5",
                           "study.levers.energy_finetune.weights=[0.05]",
                           "study.levers.energy_finetune.epochs=1")
    run = tmp_path / "run"
    seen: list[int] = []
    inits: list[Any] = []
    real = stage_levers.Study.fit

    def recording_fit(self, epochs, limit=None, predictor_overrides=None, module_overrides=None, train=None,
                      init=None, steps=None, seed=None):
        seen.append(len(self.train if train is None else train))
        inits.append(init)
        return real(self, epochs, limit, predictor_overrides, module_overrides, train, init, steps, seed)

    stage_levers.Study.fit = recording_fit  # type: ignore[method-assign]
    try:
        metrics = train(compose_config(overrides, output_dir=run))
    finally:
        stage_levers.Study.fit = real  # type: ignore[method-assign]
    rows = _rows(run / "levers.csv")
    assert [r["variant"] for r in rows] == ["baseline", "predictor small", "augment", "self-distill",
                                            "energy fine-tune w=0.05"]
    assert seen == [64, 64, 128, 64, 64]  # augmentation doubles the pairs; the baseline is not retrained
    # only the fine-tune starts from trained weights: the baseline's
    assert inits[:4] == [None] * 4 and inits[4] is not None
    assert float(rows[4]["train_s"]) > 0
    params = {r["variant"]: int(r["params"]) for r in rows}
    assert params["predictor small"] > params["baseline"]
    for row in rows:
        assert 0 < float(row["energy@20"]) <= float(row["energy@0"]) + 1e-6
    assert "## Levers" in (run / "report.md").read_text(encoding="utf-8")
    assert "levers/baseline/iterations_to_match" in metrics


def _scaling_overrides(dictionary: Path, *extra: str) -> list[str]:
    return _overrides(dictionary, "stages=[targets,scaling]", "study.scaling.sizes=[8,16,32,64]",
                      "study.scaling.predictors.small={width:8,depth:2}",
                      "study.scaling.predictors.medium={width:12,depth:2}", "~study.scaling.predictors.large",
                      "study.scaling.steps=3", "study.scaling.seeds=[0,1]", "study.scaling.seeded=[small]",
                      "study.scaling.long_factor=2", "study.scaling.long_sizes=[16,64]",
                      "study.scaling.long_predictor=small", "study.scaling.reference_iters=40",
                      "study.scaling.ood_images=14", "study.scaling.bootstrap=10",
                      "study.scaling.holdout=0.5", *extra)


def test_scaling_stage_fits_the_law_on_a_fixed_step_grid(tmp_path: Path, dictionary_path: Path) -> None:
    """Every grid point is trained for exactly `steps` optimiser steps, scored on val and OOD photos; the
    law, its held-out prediction and the Kaplan–Meier medians come out in the stage's files."""
    import json

    from warplca.config import compose_config
    from warplca.tasks.stage_scaling import point_grid
    from warplca.tasks.train import train

    run = tmp_path / "run"
    train(compose_config(_scaling_overrides(dictionary_path), output_dir=run))
    rows = _rows(run / "scaling.csv")
    conf = {"sizes": [8, 16, 32, 64], "predictors": {"small": {}, "medium": {}}, "steps": 3, "seeds": [0, 1],
            "seeded": ["small"], "long_factor": 2, "long_sizes": [16, 64], "long_predictor": "small"}
    grid = point_grid(conf, 64)
    assert len(grid) == 4 * 2 + 2 + 4 and len(rows) == 2 * len(grid)  # val and ood
    assert {(r["predictor"], int(r["size"]), int(r["seed"]), int(r["steps"])) for r in rows} == {
        (p["predictor"], p["size"], p["seed"], p["steps"]) for p in grid}
    for r in rows:
        assert float(r["gap@0"]) >= float(r["gap@10"]) - 1e-9 >= -1e-9  # E_ref is the lowest known energy
        assert 0.0 <= float(r["matched_frac"]) <= 1.0
    fit = json.loads((run / "scaling_fit.json").read_text())
    law = fit["laws"]["val/small/gap@0"]
    assert sorted(law["n"]) == [8, 8, 16, 16, 32, 32, 64, 64] and {"fit", "beta_band", "holdout"} <= set(law)
    assert law["holdout"]["n"] == 64
    assert "ood/medium/gap@1" in fit["laws"]
    md = (run / "scaling.md").read_text()
    assert "## Scaling law of the warm start" in md and "![scaling law](scaling.png)" in md
    assert (run / "scaling.png").stat().st_size > 0 and (run / "scaling.partial.json").exists()

    # a grid cut to scored points publishes without training anything
    from warplca.tasks import stage_scaling

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scored point was trained again")

    real = stage_scaling.Study.fit
    stage_scaling.Study.fit = no_fit  # type: ignore[method-assign, assignment]
    try:
        cut_grid = ("force=true", "study.scaling.sizes=[8,16,32]", "study.scaling.seeds=[0]",
                    "study.scaling.long_sizes=[16]")
        train(compose_config(_scaling_overrides(dictionary_path, *cut_grid), output_dir=run))
    finally:
        stage_scaling.Study.fit = real  # type: ignore[method-assign]
    cut = _rows(run / "scaling.csv")
    assert len(cut) == 2 * (3 + 3 + 1)  # small, medium at 3 sizes, one long point; val and ood


def test_fixed_steps_train_exactly_that_many_steps(tmp_path: Path, dictionary_path: Path) -> None:
    from warplca.config import compose_config
    from warplca.tasks.context import RunContext
    from warplca.tasks.predictor_fit import build_module, fit_quietly, target_sets
    from warplca.tasks.train import train

    run = tmp_path / "run"
    overrides = _overrides(dictionary_path, "stages=[targets]")
    train(compose_config(overrides, output_dir=run))
    ctx = RunContext(compose_config(overrides, output_dir=run), run)
    d, lca, norm = ctx.coding()
    data = target_sets(ctx, d, lca, norm, splits=("train",))["train"]
    for size, steps in ((8, 5), (64, 5)):  # 8 items at batch 32: 5 epochs; 64: 3 epochs
        module, _ = build_module(ctx, d, lca, norm)
        fit_quietly(ctx, module, torch.utils.data.Subset(data, range(size)), 1, steps=steps)
        assert module.trainer.global_step == steps
        assert module.lr_schedulers().last_epoch == steps  # the cosine runs over the steps
