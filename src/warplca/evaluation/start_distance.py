"""How accurate a start must be: time to match and early energies against the start's distance to the
target state, for starts between the prediction and the target and for perturbations of the target.

Per image the target u* is solved as the bundle's targets were (``target_iters`` steps of its target
solver, from ``meta``); the starts, all run without the start guard, are

* ``interpolation``: u₀(α) = (1 − α)·û + α·u* (α = 0 is WARP-LCA's start, α = 1 the target);
* ``noise``: u* + Gaussian noise of relative size s (per image, ‖noise‖ = s·‖u*‖);
* ``drop``: u* with a fraction p of its active coefficients set to 0 (missed support);
* ``add``: u* with p·|support| inactive coefficients set to 1.5·λ (spurious support).

For each start: the distance d = ‖u₀ − u*‖ / ‖u*‖ (mean over images), the mean energy after 0, 1 and
10 steps, and the per-image time to reach cold LCA's energy at T (Kaplan–Meier median, censored at T).
A "required distance" is claimed only when the families agree: per family the distance at which the
median time to match crosses ``budget`` is interpolated, and their spread reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from warplca.coder import solve_targets
from warplca.data.target_store import solver_continuation
from warplca.evaluation.common import EvalModel, ExperimentResult, Figure, progress
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.report import fmt, markdown_table
from warplca.evaluation.scaling_law import kaplan_meier
from warplca.settings import Annotated, Checked, Doc, Ge, NonEmpty

__all__ = ["StartDistanceSettings", "measure_start_distance", "perturbed_starts"]

COLUMNS = ["family", "level", "distance", "energy@0", "energy@1", "energy@10", "energy@T", "km_median",
           "matched_frac"]


@dataclass(frozen=True)
class StartDistanceSettings(Checked):
    """``eval.start_distance``: the perturbation levels and the budget a required distance is read at."""

    alphas: Annotated[Sequence[float], NonEmpty(), Doc("interpolation weights toward u*")] = (
        0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
    noise: Annotated[Sequence[float], Ge(0), Doc("relative Gaussian noise sizes")] = (
        0.1, 0.2, 0.4, 0.7, 1.0)
    drop: Annotated[Sequence[float], Ge(0), Doc("fractions of the support dropped")] = (0.1, 0.2, 0.4, 0.6)
    add: Annotated[Sequence[float], Ge(0), Doc("spurious support, as fractions of |support|")] = (
        0.1, 0.25, 0.5, 1.0)
    budget: Annotated[int, Ge(1), Doc("median time to match that defines the required distance")] = 250
    seed: Annotated[int, Ge(0)] = 0


def perturbed_starts(u_pred: Tensor, u_star: Tensor, lam: float, settings: StartDistanceSettings,
                     active: Tensor) -> list[tuple[str, float, Tensor]]:
    """(family, level, u₀) for every start of the study; ``active``: the support of T_λ(u*)."""
    gen = torch.Generator().manual_seed(int(settings.seed))
    starts = [("interpolation", float(a), (1 - a) * u_pred + a * u_star) for a in settings.alphas]
    flat = u_star.flatten(1)
    norms = flat.norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (u_star.dim() - 1)))
    for s in settings.noise:
        z = torch.randn(u_star.shape, generator=gen).to(u_star)
        z = z / z.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(norms)
        starts.append(("noise", float(s), u_star + s * norms * z))
    for p in settings.drop:
        keep = torch.rand(u_star.shape, generator=gen).to(u_star) >= p
        starts.append(("drop", float(p), torch.where(active & ~keep, torch.zeros_like(u_star), u_star)))
    inactive = ~active
    for p in settings.add:
        counts = active.flatten(1).sum(1).double() * p  # spurious coefficients per image
        share = (counts / inactive.flatten(1).sum(1).clamp_min(1)).view_as(norms).to(u_star)
        pick = inactive & (torch.rand(u_star.shape, generator=gen).to(u_star) < share)
        starts.append(("add", float(p), torch.where(pick, torch.full_like(u_star, 1.5 * lam), u_star)))
    return starts


@torch.no_grad()
def measure_start_distance(model: EvalModel, images: Tensor, settings: StartDistanceSettings, *,
                           iters: int = 1000, batch_size: int = 64, show_progress: bool = True,
                           device: torch.device | None = None) -> ExperimentResult:
    """Every start of :func:`perturbed_starts` on ``images`` ([0, 1]) for ``iters`` = T steps; one row per
    (family, level) and the required distance per family (``start_distance.csv`` / ``.png``)."""
    device = device or model.dictionary.weight.device
    x = model.preprocess(images.to(device))
    meta = getattr(model, "meta", {}) or {}
    target_iters = int(meta.get("target_iters") or model.lca.iters)
    u_star = solve_targets(model, images.to(device), target_iters,
                           solver_continuation(meta.get("target_solver")), batch_size)[0]
    u_pred = model.predict_states(x)
    cold_t = model.lca(x, iters=iters).energy.double().cpu()
    active = model.lca.states_to_codes(u_star) != 0
    starts = perturbed_starts(u_pred, u_star, float(model.lca.lam), settings, active)
    rows = []
    bar = progress(len(starts) * iters * x.shape[0], "start distance", show_progress)
    for family, level, u0 in starts:
        trace = model.lca(x, iters=iters, u0=u0, trace=True).trace["energy"].double().cpu()  # (T+1, N)
        hit = trace <= cold_t.unsqueeze(0)
        first = [float(hit[:, i].nonzero()[0]) if bool(hit[:, i].any()) else math.nan
                 for i in range(hit.shape[1])]
        dist = ((u0 - u_star).flatten(1).norm(dim=1) / u_star.flatten(1).norm(dim=1).clamp_min(1e-12))
        rows.append({"family": family, "level": level, "distance": float(dist.mean()),
                     "energy@0": float(trace[0].mean()), "energy@1": float(trace[1].mean()),
                     "energy@10": float(trace[min(10, iters)].mean()), "energy@T": float(trace[-1].mean()),
                     "km_median": kaplan_meier(first, iters)[2],
                     "matched_frac": float(np.mean([not math.isnan(t) for t in first]))})
        bar.update(iters * x.shape[0])
    bar.close()
    required = required_distances(rows, settings.budget)
    figure = Figure("start_distance.png", "time to match and early energy against the start's distance",
                    lambda: plot_start_distance(rows, settings.budget))
    finite = [r["distance"] for r in required if math.isfinite(r["distance"])]
    spread = (max(finite) / min(finite)) if len(finite) >= 2 and min(finite) > 0 else math.nan
    one_curve = len(finite) == len(required) and math.isfinite(spread) and spread <= 1.5
    solver = meta.get("target_solver") or "cold"
    solver_name = solver.get("name", "cold") if isinstance(solver, Mapping) else str(solver)
    if not finite:
        verdict = (f"No family's median time to match crosses {settings.budget} iterations within the levels "
                   "measured: no required distance can be read here (widen the levels).")
    else:
        verdict = one_curve_verdict(required, finite, spread, one_curve, settings.budget)
    md = ["## How accurate a start must be", "",
          f"{images.shape[0]} images; u* solved as the bundle's targets ({meta.get('target_iters', '?')} "
          f"steps, {solver_name}); WARP-LCA's own start is interpolation α = 0 (distance "
          f"{fmt(rows[0]['distance'], 3)}); no start guard; time to match = first step with energy ≤ cold "
          f"LCA's at T = {iters} (Kaplan–Meier median over images, inf: fewer than half match).", "",
          markdown_table(rows, COLUMNS, ["family", "level", "‖u₀ − u*‖/‖u*‖", "E@0", "E@1", "E@10",
                                         f"E@{iters}", "median time to match", "matched"], digits=4),
          "", verdict, "", figure.link]
    metrics = {f"start_distance/required/{r['family']}": r["distance"] for r in required}
    metrics["start_distance/spread"] = spread
    return ExperimentResult.from_lines("start_distance", md, metrics=metrics, figures={"plot": figure},
                                       csv={"start_distance.csv": (COLUMNS, rows)})


def one_curve_verdict(required: Sequence[Mapping[str, Any]], finite: Sequence[float], spread: float,
                      one_curve: bool, budget: int) -> str:
    """The sentence on whether the families give one required distance."""
    if one_curve:
        return (f"The families agree within a factor {fmt(spread, 3)}: a start within a relative distance of "
                f"about **{fmt(float(np.median(finite)), 3)}** of the target matches cold LCA's energy at T "
                f"within {budget} iterations (median image).")
    listed = ", ".join(f"{r['family']} {fmt(r['distance'], 3)}" for r in required)
    return ("The families do **not** fall on one curve (distances at which the median image matches "
            f"within {budget} iterations: {listed}): the distance ‖u₀ − u*‖/‖u*‖ alone does not say how "
            "good a start is.")


def required_distances(rows: Sequence[Mapping[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Per family, the distance where the median time to match crosses ``budget`` (log-linear between the
    two levels around it; NaN: never crosses in the measured range)."""
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        pts = sorted((r["distance"], r["km_median"]) for r in rows if r["family"] == family)
        found = math.nan
        for (d0, t0), (d1, t1) in zip(pts, pts[1:], strict=False):
            if t0 <= budget < t1 or (t0 <= budget and math.isinf(t1)):
                if math.isinf(t1) or t1 <= t0:
                    found = d0
                else:
                    w = (math.log(budget) - math.log(max(t0, 1))) / (math.log(t1) - math.log(max(t0, 1)))
                    found = d0 + w * (d1 - d0)
                break
        out.append({"family": family, "distance": found})
    return out


def plot_start_distance(rows: Sequence[Mapping[str, Any]], budget: int) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, family in enumerate(dict.fromkeys(r["family"] for r in rows)):
        pts = sorted((r for r in rows if r["family"] == family), key=lambda r: r["distance"])
        d = [r["distance"] for r in pts]
        for ax, key in zip(axes, ("km_median", "energy@1", "energy@10"), strict=True):
            ax.plot(d, [r[key] for r in pts], "o-", color=f"C{i}", label=family)
    axes[0].axhline(budget, color="grey", ls=":", lw=1)
    titles = ("median time to match cold@T", "energy after 1 step", "energy after 10 steps")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("‖u₀ − u*‖ / ‖u*‖")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


@evaluation("start_distance", StartDistanceSettings)
def start_distance_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=start_distance``: the accuracy a start needs, on the run's model and images."""
    from warplca.settings import build

    settings = build(StartDistanceSettings, session.settings["start_distance"], "eval.start_distance")
    return measure_start_distance(session.model, session.images, settings, iters=session.total(),
                                  **session.run_kwargs())
