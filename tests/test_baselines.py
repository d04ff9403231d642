"""The fair baselines of the convergence report: continuation from 0, WARP-LCA + continuation tail, the
cost curves and FLOP counts, and the bundle's ``tail`` option."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_evaluate import make_bundle, test_images


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny bundle with its start guard off (its untrained predictor would always be sent back)."""
    from warplca.bundle import WarpLCA

    loaded = WarpLCA.load(make_bundle(tmp_path_factory.mktemp("b") / "warp_lca.pt")).eval()
    return WarpLCA(loaded.dictionary, loaded.predictor, loaded.lca, loaded.normalization, start_guard=False)


def test_budget_grid_is_part_of_the_curves_grid() -> None:
    from warplca.evaluation.baselines import budget_grid
    from warplca.evaluation.common import log_spaced_ks

    assert budget_grid(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert budget_grid(30) == [1, 2, 5, 10, 20, 30]
    assert set(budget_grid(1000)) <= set(log_spaced_ks(1000))


def test_cost_curve_is_monotone_and_inverts() -> None:
    from warplca.evaluation.baselines import _steps_within, fit_cost, ms_at

    cost = fit_cost([1, 10, 100], [1.5, 6.0, 50.0])
    assert cost["ks"] == [0, 1, 10, 100] and cost["ms"][0] == pytest.approx(1.0)
    assert ms_at(cost, 55) == pytest.approx(6.0 + 45 * 44 / 90)
    assert ms_at(cost, 200) == pytest.approx(50.0 + 100 * 44 / 90)  # the last segment's slope
    noisy = fit_cost([1, 10, 100], [2.0, 1.0, 30.0])  # a noisy median below the previous one
    assert noisy["ms"] == sorted(noisy["ms"])
    for ms in (0.5, 1.2, 6.0, 20.0, 49.9, 1e6):
        n = _steps_within(cost, ms, 100)
        assert ms_at(cost, n) <= ms or n == 0
        assert n == 100 or ms_at(cost, n + 1) > ms
    assert _steps_within(fit_cost([1], [1.0]), 5.0, 100) == 0  # untimed: no steps


def test_conditions_are_the_solvers_they_name(model: Any) -> None:
    from warplca.evaluation.baselines import BaselineSettings, solve_condition
    from warplca.lca.continuation import Continuation, solve_continuation

    x = model.preprocess(test_images()[:4])
    s = BaselineSettings(schedule=Continuation(start_factor=3.0, stages=4, anneal_frac=0.5), tail_factor=2.0)
    u0 = model.predict_states(x)
    with torch.no_grad():
        assert torch.equal(solve_condition(model, x, 12, "cold", s).u, model.lca(x, iters=12).u)
        assert torch.equal(solve_condition(model, x, 12, "warm", s).u, model.lca(x, iters=12, u0=u0).u)
        cont = solve_continuation(model.lca, x, 12, Continuation(3.0, 4, 0.5))
        assert torch.equal(solve_condition(model, x, 12, "continuation", s).u, cont.u)
        tail = solve_continuation(model.lca, x, 12, Continuation(2.0, 4, 0.5), u0=u0)
        assert torch.equal(solve_condition(model, x, 12, "warm_tail", s).u, tail.u)
        assert not torch.equal(tail.u, model.lca(x, iters=12, u0=u0).u)  # the tail changes the run
    with pytest.raises(ValueError, match="unknown condition"):
        solve_condition(model, x, 1, "hot", s)


def test_flop_model_is_linear_in_the_steps(model: Any) -> None:
    from warplca.evaluation.baselines import BaselineSettings, count_flops, flop_model

    x = model.preprocess(test_images()[:2])
    f = flop_model(model, x, BaselineSettings())
    assert f["step"] > 0 and f["setup"] > 0 and f["predictor"] > 0 and f["stages"] == 11
    with torch.no_grad():
        assert count_flops(lambda: model.lca(x[:1], iters=7)) == f["setup"] + 7 * f["step"]
        assert count_flops(lambda: model.predict_states(x[:1])) == f["predictor"]


def test_measured_baselines_equal_direct_runs(model: Any, tmp_path: Path) -> None:
    """Report rows are the means of the direct runs; cold/warm rows come from the curves."""
    from warplca.evaluation.baselines import BaselineSettings, solve_condition
    from warplca.evaluation.convergence import TimingSettings, measure_convergence
    from warplca.evaluation.report import read_csv, write_result

    images = test_images()[:6]
    settings = BaselineSettings(ks=(1, 4, 12))
    result = measure_convergence(model, images, iters=12, budgets=[1, 12], batch_size=4, examples=0,
                                 timing=TimingSettings(images=4, repeats=1, max_seconds=0.1),
                                 baselines=settings, show_progress=False)
    write_result(result, tmp_path)
    rows = {(r["condition"], int(r["k"])): r for r in read_csv(tmp_path / "convergence_baselines.csv")}
    assert sorted(rows) == sorted((c, k) for c in ("cold", "continuation", "warm", "warm_tail")
                                  for k in (1, 4, 12))
    x = model.preprocess(images)
    with torch.no_grad():
        for cond in ("cold", "continuation", "warm", "warm_tail"):
            for k in (1, 4, 12):
                res = solve_condition(model, x, k, cond, settings)
                energy = float(model.lca.energy(x, res.a).double().mean())
                assert float(rows[(cond, k)]["energy"]) == pytest.approx(energy, rel=1e-5), (cond, k)
                l0 = float((res.a != 0).sum()) / images.shape[0]
                assert float(rows[(cond, k)]["l0"]) == pytest.approx(l0), (cond, k)
    equal = read_csv(tmp_path / "convergence_equal_time.csv")
    assert [int(r["k"]) for r in equal] == [1, 12]
    for r in equal:
        assert 0 <= int(r["cold_iterations"]) <= 12 and 0 <= int(r["continuation_iterations"]) <= 12
        assert int(r["cold_iterations_equal_flops"]) >= int(r["k"])  # the predictor costs ≥ 0 steps
    report = (tmp_path / "report.md").read_text()
    assert "### Fair baselines" in report and "convergence_baselines.png" in report
    assert "convergence/baselines/continuation/energy@12" in result.metrics
    assert (tmp_path / "convergence_baselines.png").stat().st_size > 0


def test_baselines_can_be_switched_off(model: Any) -> None:
    from warplca.evaluation.baselines import BaselineSettings
    from warplca.evaluation.convergence import TimingSettings, measure_convergence

    result = measure_convergence(model, test_images()[:2], iters=5, budgets=[5], examples=0,
                                 timing=TimingSettings(enabled=False),
                                 baselines=BaselineSettings(enabled=False), show_progress=False)
    assert not any("baselines" in k for k in result.metrics) and "### Fair baselines" not in result.markdown


def test_bundle_tail_round_trips_and_runs_continuation(model: Any, tmp_path: Path) -> None:
    from warplca.bundle import WarpLCA
    from warplca.lca.continuation import Continuation, solve_continuation

    tail = Continuation(start_factor=2.0, stages=3, anneal_frac=0.6)
    with_tail = WarpLCA(model.dictionary, model.predictor, model.lca, model.normalization,
                        start_guard=False, tail=tail)
    loaded = WarpLCA.load(with_tail.save(tmp_path / "tail.pt"))
    assert loaded.tail == tail and WarpLCA.load(model.save(tmp_path / "plain.pt")).tail is None
    x = model.preprocess(test_images()[:3])
    with torch.no_grad():
        expected = solve_continuation(model.lca, x, 9, tail, u0=model.predict_states(x))
        assert torch.equal(loaded(x, iters=9).u, expected.u)
        assert torch.equal(loaded(x, iters=9, warm=False).u, model.lca(x, iters=9).u)  # cold: no tail
    with pytest.raises(ValueError, match="continuation tail"):
        loaded(x, iters=3, trace=True)
    with pytest.raises(ValueError, match="tail must be"):
        WarpLCA(model.dictionary, model.predictor, model.lca, tail={"start_factor": 2.0})  # type: ignore[arg-type]
    assert not math.isnan(float(expected.energy.mean()))


# -- the accuracy a start needs ---------------------------------------------------------------------------
def test_perturbed_starts_are_what_they_claim(model: Any) -> None:
    from warplca.coder import solve_targets
    from warplca.evaluation.start_distance import StartDistanceSettings, perturbed_starts
    from warplca.lca.continuation import Continuation

    x = model.preprocess(test_images()[:4])
    u_star = solve_targets(model, test_images()[:4], 15, Continuation())[0]
    u_pred = model.predict_states(x)
    active = model.lca.states_to_codes(u_star) != 0
    s = StartDistanceSettings(alphas=(0.0, 1.0), noise=(0.3,), drop=(0.5,), add=(0.5,))
    starts = {(f, lv): u for f, lv, u in perturbed_starts(u_pred, u_star, model.lca.lam, s, active)}
    assert torch.equal(starts[("interpolation", 0.0)], u_pred)
    assert torch.equal(starts[("interpolation", 1.0)], u_star)
    rel = (starts[("noise", 0.3)] - u_star).flatten(1).norm(dim=1) / u_star.flatten(1).norm(dim=1)
    assert torch.allclose(rel, torch.full_like(rel, 0.3), rtol=1e-5)
    dropped = starts[("drop", 0.5)]
    changed = dropped != u_star
    assert bool((dropped[changed] == 0).all()) and bool(active[changed].all()) and bool(changed.any())
    added = starts[("add", 0.5)]
    changed = added != u_star
    assert not bool(active[changed].any()) and bool(changed.any())
    assert torch.allclose(added[changed], torch.full_like(added[changed], 1.5 * model.lca.lam))


def test_required_distance_reads_the_budget_crossing() -> None:
    from warplca.evaluation.start_distance import required_distances

    rows = [{"family": "a", "distance": 0.1, "km_median": 100.0}, {"family": "a", "distance": 0.3,
                                                                     "km_median": 400.0},
            {"family": "b", "distance": 0.2, "km_median": 50.0}, {"family": "b", "distance": 0.5,
                                                                    "km_median": math.inf},
            {"family": "c", "distance": 0.2, "km_median": 10.0}]
    got = {r["family"]: r["distance"] for r in required_distances(rows, 200)}
    assert got["a"] == pytest.approx(0.1 + 0.2 * math.log(2) / math.log(4))  # log-linear in the time
    assert got["b"] == 0.2 and math.isnan(got["c"])  # never crossing within the levels: NaN


def test_start_distance_evaluation_runs(model: Any) -> None:
    from warplca.evaluation.start_distance import StartDistanceSettings, measure_start_distance

    model.meta = {"target_iters": 15, "target_solver": {"name": "continuation"}}
    result = measure_start_distance(model, test_images()[:3], StartDistanceSettings(
        alphas=(0.0, 0.5, 1.0), noise=(0.2,), drop=(0.3,), add=(0.3,), budget=3), iters=12,
        show_progress=False)
    rows = result.csv["start_distance.csv"][1]
    assert [(r["family"], r["level"]) for r in rows][:3] == [("interpolation", 0.0), ("interpolation", 0.5),
                                                          ("interpolation", 1.0)]
    assert rows[2]["distance"] == 0.0 and rows[0]["distance"] > rows[1]["distance"] > 0
    assert "## How accurate a start must be" in result.markdown


def test_equal_sparsity_calibration_matches_the_reference_l0(model: Any) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "equal_sparsity.py"
    spec = importlib.util.spec_from_file_location("equal_sparsity", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = model.preprocess(test_images()[:6])
    target = bench.mean_l0(model, x, "hard", model.lca.lam, 20)
    row = bench.calibrate(model, x, "soft", target, 20, tol=0.05, lo=0.001, hi=5.0)
    assert abs(row["l0"] - target) <= 0.05 * target
    assert row["l0"] == pytest.approx(bench.mean_l0(model, x, "soft", row["lam"], 20))
    with pytest.raises(ValueError, match="widen"):
        bench.calibrate(model, x, "soft", target, 20, tol=0.05, lo=1.0, hi=5.0)  # bracket misses it
