"""The extension points, each exercised by a toy extension defined here as a user would write it.

- a threshold: one :class:`~warplca.lca.thresholds.Threshold` subclass (map + penalty), usable by LCA;
- a predictor: any ``nn.Module`` with ``forward(x)`` and ``config()``, registered for bundles;
- an evaluation: one function registered with ``@evaluation(name)`` plus its ``conf/eval/<name>.yaml``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from warplca import LCA, ConvDictionary, WarpLCA
from warplca.bundle import (
    DEFAULT_PREDICTOR,
    FORMAT,
    PredictorNotAllowedError,
    check_predictor_target,
    predictor_hparams,
    predictor_path,
    rebuild_predictor,
    register_predictor,
)
from warplca.evaluation.common import ExperimentResult
from warplca.evaluation.experiments import MODES, EvalSession, evaluation, get_evaluation
from warplca.lca.thresholds import THRESHOLDS, Threshold, check_threshold, get_threshold
from warplca.serialization import save_atomic


# -- the toy extensions ----------------------------------------------------------------------------------
class ElasticThreshold(Threshold, name="toy_elastic"):
    """Elastic net: P(a) = λ|a| + c·a²/2 with c = θ/(1 − θ), whose proximal map is (1 − θ)·soft_λ(u)."""

    def check(self) -> None:
        if not 0.0 < self.theta < 1.0:
            raise ValueError(f"theta of toy_elastic must lie in (0, 1), got {self.theta!r}")

    def signed_map(self, u: Tensor) -> Tensor:
        return (1.0 - self.theta) * F.softshrink(u, self.lam)

    def signed_penalty(self, a: Tensor) -> Tensor:
        c = self.theta / (1.0 - self.theta)
        return self.lam * a.abs() + 0.5 * c * a * a


@register_predictor
class ToyPredictor(nn.Module):
    """One strided 3×3 convolution: images (B, C, H, W) -> states (B, K, ⌈H/s⌉, ⌈W/s⌉)."""

    def __init__(self, in_channels: int, n_atoms: int, stride: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_channels, self.n_atoms, self.stride, self.scale = in_channels, n_atoms, stride, scale
        self.conv = nn.Conv2d(in_channels, n_atoms, 3, stride=stride, padding=1)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "n_atoms": self.n_atoms, "stride": self.stride,
                "scale": self.scale}

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.conv(x)


class UnregisteredPredictor(ToyPredictor):
    """The same network, not registered: bundles must refuse to rebuild it."""


@evaluation("toy_energy")
def toy_energy(session: EvalSession) -> ExperimentResult:
    """Mean energy of cold LCA and WARP-LCA after T steps on the session's images."""
    model = session.model
    x = model.preprocess(session.images.to(session.device))
    iters = session.total()
    energies = {"cold": model(x, iters=iters, warm=False).energy, "warm": model(x, iters=iters).energy}
    rows = [{"method": k, "iters": iters, "energy": float(v.mean())} for k, v in energies.items()]
    md = ["## Toy energy", "", "| method | energy |", "|---|---|",
          *[f"| {r['method']} | {r['energy']:.4f} |" for r in rows]]
    return ExperimentResult.from_lines(
        "toy_energy", md, metrics={f"toy_energy/{r['method']}": r["energy"] for r in rows},
        csv={"toy_energy.csv": (["method", "iters", "energy"], rows)})


# -- thresholds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("theta", [0.2, 0.6])
def test_toy_threshold_is_the_brute_force_prox_of_its_penalty(theta: float, nonneg: bool) -> None:
    lam = 0.7
    thr = get_threshold("toy_elastic", lam=lam, nonneg=nonneg, theta=theta)
    assert isinstance(thr, ElasticThreshold) and "toy_elastic" in THRESHOLDS and thr.name == "toy_elastic"
    step = 5e-4
    grid = torch.from_numpy(np.round(np.arange(-4.0, 4.0 + step / 2, step), 10))
    u = torch.linspace(-3.0, 3.0, 1201, dtype=torch.float64)
    # the penalty written out here, the indicator of a ≥ 0 included for the non-negative variant
    c = theta / (1 - theta)
    pen = lam * grid.abs() + 0.5 * c * grid**2
    if nonneg:
        pen = torch.where(grid < 0, torch.full_like(pen, np.inf), pen)
    torch.testing.assert_close(thr.penalty(grid), pen, rtol=1e-12, atol=1e-12)
    obj = 0.5 * (grid[None, :] - u[:, None]) ** 2 + pen[None, :]
    best = grid[obj.argmin(1)]
    ours = thr(u)
    torch.testing.assert_close(ours, best, atol=1.5 * step, rtol=0)
    ours_obj = 0.5 * (ours - u) ** 2 + thr.penalty(ours)
    assert bool((ours_obj <= obj.min(1).values + 1e-9).all())
    dead = (u.abs() <= lam - 0.01) | ((u < 0) if nonneg else torch.zeros_like(u, dtype=torch.bool))
    assert bool((ours[dead] == 0).all()) and int(dead.sum()) > 100
    # the per-sample sum (batch dimension kept), and +∞ for negative codes only in the non-negative variant
    a = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(thr.penalty_sum(a.abs()), thr.penalty(a.abs()).flatten(1).sum(1))
    assert bool(torch.isinf(thr.penalty_sum(-a.abs())).all()) == nonneg


def test_toy_threshold_runs_in_lca_with_a_consistent_descending_energy() -> None:
    d = ConvDictionary(n_atoms=6, in_channels=1, kernel_size=5, stride=2, seed=0)
    lca = LCA(d, threshold="toy_elastic", lam=0.05, theta=0.3, tau="auto", iters=60)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) - 0.5
    res = lca(x, trace=True)
    assert res.trace is not None and res.energy is not None
    energy = res.trace["energy"]
    assert bool((energy[1:] <= energy[:-1] * (1 + 1e-5) + 1e-7).all()), "tau=auto must descend"
    assert float(energy[-1].sum()) < 0.5 * float(x.square().sum())
    # the trace, the solver's energy() and the energy written out here agree
    c = 0.3 / 0.7
    recon = d.decode(res.a, size=(12, 12))
    penalty = 0.05 * res.a.abs() + 0.5 * c * res.a**2
    ref = 0.5 * (x - recon).square().flatten(1).sum(1) + penalty.flatten(1).sum(1)
    torch.testing.assert_close(energy[-1], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lca.energy(x, res.a), ref, rtol=1e-4, atol=1e-5)
    assert bool((res.a != 0).any()) and bool((res.a == 0).any())
    # the settings name the threshold, so a solver rebuilt from them (as bundles do) is the same one
    again = LCA(d, **lca.settings())
    assert again.threshold == lca.threshold and torch.equal(again(x).a, res.a)


def test_threshold_registry_refuses_bad_names_and_parameters() -> None:
    assert check_threshold("toy_elastic", 0.5, False, 0.3) is None
    assert "theta" in (check_threshold("toy_elastic", 0.5, False, 1.5) or "")
    assert "lam" in (check_threshold("toy_elastic", -1.0) or "")
    assert "must be one of" in (check_threshold("nope") or "")
    with pytest.raises(ValueError, match="already registered"):
        type("Clash", (Threshold,), {}, name="soft")
    with pytest.raises(TypeError, match="not a registered threshold"):
        Threshold(lam=1.0)


# -- predictors ------------------------------------------------------------------------------------------
def _bundle(predictor: nn.Module) -> WarpLCA:
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=1)
    return WarpLCA(d, predictor, LCA(d, threshold="toy_elastic", lam=0.05, theta=0.3, tau="auto", iters=10))


def test_toy_predictor_round_trips_through_a_bundle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _bundle(ToyPredictor(3, 6, 2, scale=0.5))
    path = model.save(tmp_path / "warp_lca.pt")
    raw = torch.load(path, weights_only=True)  # the file holds plain data only
    assert raw["predictor"]["target"] == predictor_path(ToyPredictor)
    loaded = WarpLCA.load(path)
    assert type(loaded.predictor) is ToyPredictor and loaded.predictor.config() == model.predictor.config()
    x = torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(1)) - 0.5
    assert torch.equal(loaded.predict_states(x), model.predict_states(x))
    a, b = model(x, iters=5), loaded(x, iters=5)
    assert torch.equal(a.u, b.u) and torch.equal(a.recon, b.recon)
    assert loaded.lca.threshold == model.lca.threshold


def test_a_predictor_outside_the_allowlist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not allowed in bundles"):
        _bundle(UnregisteredPredictor(3, 6, 2)).save(tmp_path / "x.pt")
    payload = _bundle(ToyPredictor(3, 6, 2)).to_payload()
    for target in (predictor_path(UnregisteredPredictor), "evil_module_never_imported.Payload"):
        payload["predictor"]["target"] = target
        path = save_atomic({**payload, "meta": {}}, tmp_path / "foreign.pt", FORMAT)
        with pytest.raises(PredictorNotAllowedError, match=r"foreign\.pt: predictor class .* is not allowed"):
            WarpLCA.load(path)
    assert "evil_module_never_imported" not in sys.modules  # refused before any import


def test_check_predictor_target_names_the_problem_before_any_work() -> None:
    assert check_predictor_target(DEFAULT_PREDICTOR) is None
    assert check_predictor_target("warplca.models.WarpCNN") is None  # a re-export of the same class
    assert check_predictor_target(predictor_path(ToyPredictor)) is None
    assert "not allowed" in (check_predictor_target(predictor_path(UnregisteredPredictor)) or "")
    assert "cannot be imported" in (check_predictor_target("no_such_package.Net") or "")
    assert "cannot be imported" in (check_predictor_target("warplca.models.NoSuchNet") or "")
    assert "nn.Module" in (check_predictor_target("collections.OrderedDict") or "")
    assert "config()" in (check_predictor_target("torch.nn.Linear") or "")


def test_warp_regression_rebuilds_the_predictor_through_the_allowlist() -> None:
    from warplca.modules.warp_regression import WarpRegression

    model = _bundle(ToyPredictor(3, 6, 2, scale=0.25))
    module = WarpRegression(model.predictor, model.dictionary, model.lca.settings(), loss="mse")
    hparams = dict(module.hparams)
    assert hparams["predictor"] == predictor_hparams(model.predictor)
    assert hparams["predictor"]["_target_"] == predictor_path(ToyPredictor)
    again = WarpRegression(**hparams)  # what load_from_checkpoint does before loading the weights
    assert type(again.predictor) is ToyPredictor and again.predictor.config() == model.predictor.config()
    bad = {**hparams["predictor"], "_target_": predictor_path(UnregisteredPredictor)}
    with pytest.raises(PredictorNotAllowedError, match="not allowed"):
        rebuild_predictor(bad)
    # checkpoints written before the class path was saved hold a bare WarpCNN config
    old = rebuild_predictor({"in_channels": 3, "n_atoms": 6, "stride": 2, "width": 4, "depth": 1,
                             "drive_scale": 1.0})
    assert predictor_path(type(old)) == DEFAULT_PREDICTOR


# -- evaluations -----------------------------------------------------------------------------------------
def test_toy_evaluation_runs_through_the_evaluate_entry(tmp_path: Path) -> None:
    from warplca.config import compose_config
    from warplca.tasks.evaluate import evaluate

    assert "toy_energy" in MODES and get_evaluation("toy_energy").run is toy_energy
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    torch.manual_seed(0)
    _bundle(ToyPredictor(3, 6, 2, scale=0.1)).save(run / "warp_lca.pt")
    data = {"_target_": "warplca.data.NaturalDataModule", "crop_size": 16, "n_train": 8, "n_val": 4,
            "n_test": 4, "batch_size": 4, "seed": 0}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": data}))
    conf = tmp_path / "conf" / "eval"  # the evaluation's one YAML, found through Hydra's search path
    conf.mkdir(parents=True)
    (conf / "toy_energy.yaml").write_text("# @package eval\ndefaults:\n  - common\n  - _self_\n"
                                          "modes: [toy_energy]\n")
    cfg = compose_config([f"run_dir={run}", "eval=toy_energy", f"hydra.searchpath=[file://{conf.parent}]",
                          f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false", "device=cpu",
                          "eval.n_images=4", "eval.iters=8"],
                         config_name="eval")
    assert list(cfg.eval.modes) == ["toy_energy"]
    metrics = evaluate(cfg)
    assert set(metrics) == {"eval/toy_energy/cold", "eval/toy_energy/warm"}
    assert all(np.isfinite(v) and v > 0 for v in metrics.values())
    rows = (run / "toy_energy.csv").read_text().splitlines()
    assert rows[0] == "method,iters,energy" and len(rows) == 3
    assert "## Toy energy" in (run / "report.md").read_text()
    saved = json.loads((run / "metrics.json").read_text())["eval"]
    assert saved["toy_energy/cold"] == pytest.approx(metrics["eval/toy_energy/cold"])


def test_unknown_and_clashing_evaluations_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown evaluation mode 'nope'; registered: .*toy_energy"):
        get_evaluation("nope")
    with pytest.raises(ValueError, match="already registered"):
        evaluation("toy_energy")(lambda session: ExperimentResult())
    assert {"convergence", "thresholds", "denoise", "ood", "robustness"} <= set(MODES)
