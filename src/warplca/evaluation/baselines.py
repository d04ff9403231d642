"""Fair baselines for the convergence report: cold LCA, λ-continuation LCA from u = 0, WARP-LCA and
WARP-LCA with a continuation tail, compared at equal iterations, equal wall time and equal FLOPs.

The predictor imitates λ-continuation states, and continuation from u = 0 — no learning — already finds
lower, sparser minima than cold LCA; so a gain of WARP-LCA counts against it too. A continuation run of
k steps anneals over its own k steps (its energy after k is not a prefix of a longer run), so every
budget is a run of its own. Cold and WARP-LCA energies come from their traced curves.

Cost model: per condition, ms / image = a + b·k fitted (least squares) to medians timed at the budgets;
FLOPs counted by ``torch.utils.flop_counter`` for one LCA step, the per-call setup (Φᵀx) and the
predictor (+ the start guard), per image. "Equal wall time" gives every method the milliseconds WARP-LCA
used at its budget k: cold LCA's energy at that many steps is read from its trace, continuation is run
for that many steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from warplca.evaluation.common import (
    EvalModel,
    Figure,
    batch_slices,
    median_ms,
    pixel_quality,
    progress,
    to_pixels,
)
from warplca.evaluation.curves import Curves, full_run_solver, warm_start
from warplca.evaluation.report import fmt, markdown_table
from warplca.lca.continuation import Continuation, solve_continuation
from warplca.settings import Annotated, Checked, Doc, Ge

__all__ = ["CONDITIONS", "BaselineSettings", "Baselines", "budget_grid", "count_flops", "fit_cost", "ms_at",
           "measure_baselines", "solve_condition"]

#: the four ways to spend a budget of k LCA steps
CONDITIONS: dict[str, str] = {
    "cold": "LCA (cold)",
    "continuation": "λ-continuation LCA (from 0)",
    "warm": "WARP-LCA",
    "warm_tail": "WARP-LCA + continuation tail",
}


@dataclass(frozen=True)
class BaselineSettings(Checked):
    """``eval.convergence.baselines``: the continuation baseline and the warm start's continuation tail."""

    enabled: Annotated[bool, Doc("measure continuation, the tail, equal wall time and FLOPs")] = True
    schedule: Continuation = Continuation()
    tail_factor: Annotated[float, Ge(1), Doc("λ factor the warm start's continuation tail starts from")] = 4.0
    ks: Annotated[Sequence[int] | None, Ge(1), Doc("budgets (null: the 1-2-5 decades up to T)")] = None

    def tail(self) -> Continuation:
        """The tail's schedule: the baseline's, started at ``tail_factor``·λ."""
        return replace(self.schedule, start_factor=self.tail_factor)


@dataclass
class Baselines:
    """What :func:`measure_baselines` found: per-budget rows, the equal-cost rows, the cost models."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    equal_cost: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    pays_until: dict[str, Any] = field(default_factory=dict)


def budget_grid(total: int) -> list[int]:
    """The 1-2-5 decades up to ``total``, ``total`` included (a subset of the curves' log grid)."""
    ks, decade = {int(total)}, 1
    while decade <= total:
        ks.update(m * decade for m in (1, 2, 5) if m * decade <= total)
        decade *= 10
    return sorted(ks)


def solve_condition(model: EvalModel, x: Tensor, iters: int, condition: str,
                    settings: BaselineSettings) -> Any:
    """The LCA result of ``condition`` (a :data:`CONDITIONS` key) on ``x`` (coded space) after ``iters``."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {sorted(CONDITIONS)}")
    solver = full_run_solver(model)
    u0 = warm_start(model, x)[0] if condition.startswith("warm") else None
    if condition in ("cold", "warm"):
        return solver(x, iters=iters, u0=u0)
    schedule = settings.schedule if condition == "continuation" else settings.tail()
    return solve_continuation(solver, x, iters, schedule, u0=u0)


@torch.no_grad()
def _run(model: EvalModel, images: Tensor, iters: int, condition: str, settings: BaselineSettings,
         batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """Per-image energy, ℓ0, PSNR and SSIM of ``condition`` after ``iters`` steps."""
    out: dict[str, list[Tensor]] = {"energy": [], "l0": [], "psnr": [], "ssim": []}
    for sl in batch_slices(images.shape[0], batch_size):
        img = images[sl].to(device)
        x = model.preprocess(img)
        res = solve_condition(model, x, iters, condition, settings)
        psnr, ssim = pixel_quality(to_pixels(model, res.recon, img), img)
        out["energy"].append(model.lca.energy(x, res.a).double().cpu())
        out["l0"].append((res.a != 0).flatten(1).sum(1).double().cpu())
        out["psnr"].append(psnr.double().cpu())
        out["ssim"].append(ssim.double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _from_curves(curves: Curves, k: int) -> dict[str, Tensor]:
    row = {"energy": curves.energy[k].double(), "l0": curves.l0[k].double()}
    if k in curves.ks:
        j = curves.ks.index(k)
        row |= {"psnr": curves.psnr[j], "ssim": curves.ssim[j]}
    return row


# -- cost ----------------------------------------------------------------------------------------------
def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs of ``call()`` as ``torch.utils.flop_counter`` counts them (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


@torch.no_grad()
def flop_model(model: EvalModel, x: Tensor, settings: BaselineSettings) -> dict[str, float]:
    """Per-image FLOPs: ``step`` (one LCA step), ``setup`` (a solver call's fixed part), ``predictor``
    (+ start guard where there is one) and ``stages`` (solver calls of a continuation run)."""
    x1 = x[:1]
    solver = full_run_solver(model)
    one, two = (count_flops(lambda k=k: solver(x1, iters=k)) for k in (1, 2))
    pred = count_flops(lambda: warm_start(model, x1))
    return {"step": float(two - one), "setup": float(one - (two - one)), "predictor": float(pred),
            "stages": float(len(settings.schedule.schedule(1.0, 1000)))}


def fit_cost(ks: Sequence[int], ms: Sequence[float]) -> dict[str, list[float]]:
    """A monotone cost curve ms(k) through medians timed at the budgets ``ks``: the points (made
    non-decreasing) and a k = 0 point extrapolated from the first two (never below 0)."""
    pts = sorted((int(k), float(t)) for k, t in zip(ks, ms, strict=True) if math.isfinite(t))
    if len(pts) < 2:
        return {"ks": [], "ms": []}
    (k1, t1), (k2, t2) = pts[0], pts[1]
    t0 = max(0.0, t1 - k1 * max(t2 - t1, 0.0) / max(k2 - k1, 1))
    k = np.array([0, *(p[0] for p in pts)], float)
    t = np.maximum.accumulate(np.array([t0, *(p[1] for p in pts)], float))
    return {"ks": k.tolist(), "ms": t.tolist()}


def ms_at(cost: Mapping[str, Sequence[float]], k: float) -> float:
    """Milliseconds per image of ``k`` steps on a :func:`fit_cost` curve (linear between timed budgets)."""
    if not cost["ks"]:
        return math.nan
    ks, ms = np.asarray(cost["ks"]), np.asarray(cost["ms"])
    if k > ks[-1]:  # beyond the last budget: the last segment's slope
        slope = (ms[-1] - ms[-2]) / max(ks[-1] - ks[-2], 1)
        return float(ms[-1] + slope * (k - ks[-1]))
    return float(np.interp(k, ks, ms))


def _steps_within(cost: Mapping[str, Sequence[float]], ms: float, total: int) -> int:
    """The most steps a condition with the cost curve ``cost`` runs within ``ms`` (0 … total)."""
    if not cost["ks"] or not math.isfinite(ms):
        return 0
    lo, hi = 0, int(total)
    while lo < hi:  # ms_at is non-decreasing in k
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ms_at(cost, mid) <= ms else (lo, mid - 1)
    return lo


# -- the measurement -----------------------------------------------------------------------------------
@torch.no_grad()
def measure_baselines(model: EvalModel, images: Tensor, curves: Mapping[str, Curves],
                      times: Mapping[str, float], settings: BaselineSettings, *, total: int,
                      timed_budgets: Sequence[int], timing: tuple[int, int, float] = (32, 3, 10.0),
                      batch_size: int = 64, device: torch.device | None = None,
                      show_progress: bool = True) -> Baselines:
    """The four conditions at equal iterations (budgets ``settings.ks``) and, where ``times`` (the
    convergence timing, ``<cold|warm>@<k>`` ms / image) is given, at equal wall time and equal FLOPs;
    ``timing``: images per timed batch, repeats and seconds per budget (as the convergence timing)."""
    device = device or model.dictionary.weight.device
    ks = [k for k in (settings.ks or budget_grid(total)) if 1 <= k <= total]
    runs = [(c, k) for c in ("continuation", "warm_tail") for k in ks]
    bar = progress(sum(k for _, k in runs) * images.shape[0], "baselines: continuation, tail", show_progress)
    per: dict[tuple[str, int], dict[str, Tensor]] = {}
    for cond, k in runs:
        per[(cond, k)] = _run(model, images, k, cond, settings, batch_size, device)
        bar.update(k * images.shape[0])
    bar.close()
    for cond in ("cold", "warm"):
        per.update({(cond, k): _from_curves(curves[cond], k) for k in ks})
    rows = [{"condition": c, "method": CONDITIONS[c], "k": k,
             **{m: float(v.mean()) for m, v in per[(c, k)].items()}}
            for k in ks for c in CONDITIONS]

    result = Baselines(rows=rows)
    timing_images, repeats, max_seconds = timing
    x = model.preprocess(images[: max(1, timing_images)].to(device))
    flops = flop_model(model, x, settings)
    result.cost["flops"] = flops
    if not times:
        return result
    n = x.shape[0]
    timed = [k for k in timed_budgets if 1 <= k <= total]
    ms = {c: [times.get(f"{c}@{k}", math.nan) for k in timed] for c in ("cold", "warm")}
    for cond in ("continuation", "warm_tail"):
        ms[cond] = []
        for k in timed:
            run = lambda k=k, c=cond: solve_condition(model, x, k, c, settings)  # noqa: E731
            run()  # warm-up
            ms[cond].append(median_ms(run, n, repeats, max_seconds, device))
    result.cost |= {c: fit_cost(timed, v) for c, v in ms.items()}

    flops_of = {  # per image, k steps
        "cold": lambda k: flops["setup"] + k * flops["step"],
        "continuation": lambda k: flops["stages"] * flops["setup"] + k * flops["step"],
        "warm": lambda k: flops["predictor"] + flops["setup"] + k * flops["step"],
        "warm_tail": lambda k: flops["predictor"] + flops["stages"] * flops["setup"] + k * flops["step"],
    }
    cold_e = curves["cold"].energy.double().mean(1)
    for k in timed:
        budget_ms = times.get(f"warm@{k}", math.nan)
        if not math.isfinite(budget_ms):
            continue
        n_cold = _steps_within(result.cost["cold"], budget_ms, total)
        n_cont = _steps_within(result.cost["continuation"], budget_ms, total)
        n_tail = _steps_within(result.cost["warm_tail"], budget_ms, total)
        budget_flops = flops_of["warm"](k)
        n_cold_f = int(min(total, max(0, (budget_flops - flops["setup"]) // max(flops["step"], 1.0))))
        cont = _run(model, images, n_cont, "continuation", settings, batch_size, device)["energy"].mean()
        tail = (_run(model, images, n_tail, "warm_tail", settings, batch_size, device)["energy"].mean()
                if n_tail else math.nan)
        result.equal_cost.append({
            "k": k, "ms": budget_ms, "mflops": budget_flops / 1e6,
            "warm_energy": float(curves["warm"].energy[k].double().mean()),
            "cold_iterations": n_cold, "cold_energy": float(cold_e[n_cold]),
            "continuation_iterations": n_cont, "continuation_energy": float(cont),
            "warm_tail_iterations": n_tail, "warm_tail_energy": float(tail),
            "cold_iterations_equal_flops": n_cold_f, "cold_energy_equal_flops": float(cold_e[n_cold_f]),
        })
    result.pays_until = _pays_until(curves, per, ks, result.cost, total)
    return result


def _pays_until(curves: Mapping[str, Curves], per: Mapping[tuple[str, int], Mapping[str, Tensor]],
                ks: Sequence[int], cost: Mapping[str, Mapping[str, float]], total: int) -> dict[str, Any]:
    """The first WARP-LCA budget k whose energy is not below what cold LCA (trace) or continuation
    (its budget points, interpolated in log-milliseconds) reach in the same wall time."""
    warm_e = curves["warm"].energy.double().mean(1)
    cold_e = curves["cold"].energy.double().mean(1)
    cont_ms = np.log([max(ms_at(cost["continuation"], k), 1e-9) for k in ks])
    cont_e = np.array([float(per[("continuation", k)]["energy"].mean()) for k in ks])
    for k in range(1, total + 1):
        t = ms_at(cost["warm"], k)
        n_cold = _steps_within(cost["cold"], t, total)
        e_cont = float(np.interp(math.log(t), cont_ms, cont_e, left=math.inf, right=cont_e[-1]))
        best = min(float(cold_e[n_cold]), e_cont)
        if float(warm_e[k]) >= best:
            return {"k": k, "ms": t, "by": "cold" if float(cold_e[n_cold]) <= e_cont else "continuation"}
    return {"k": math.nan, "ms": math.nan, "by": ""}


# -- report ----------------------------------------------------------------------------------------------
def baselines_markdown(result: Baselines, settings: BaselineSettings, figure: Figure | None) -> list[str]:
    """The report lines: equal-iterations table, equal-cost table, the cost model, the verdict."""
    s = settings.schedule
    lines = [
        "### Fair baselines: λ-continuation and equal cost", "",
        f"λ-continuation LCA starts from u = 0 and anneals λ from {fmt(s.start_factor)}·λ down to λ in "
        f"{s.stages} stages over {fmt(100 * s.anneal_frac)} % of its steps (the schedule of the targets); "
        f"WARP-LCA + tail starts from the prediction and anneals from {fmt(settings.tail_factor)}·λ the same "
        "way. Every budget is a run of its own; energy at the target λ.", "",
        markdown_table(result.rows, ("k", "method", "energy", "l0", "psnr", "ssim"),
                       ("iterations", "method", "energy", "ℓ0 / image", "PSNR (dB)", "SSIM"), digits=4),
    ]
    flops = result.cost.get("flops", {})
    if flops:
        lines += ["", f"FLOPs per image: one LCA step {fmt(flops['step'] / 1e6, 4)} M, a solver call's setup "
                  f"{fmt(flops['setup'] / 1e6, 4)} M, the predictor (+ start guard) "
                  f"{fmt(flops['predictor'] / 1e6, 4)} M = "
                  f"{fmt(flops['predictor'] / max(flops['step'], 1), 3)} LCA steps."]
    if result.equal_cost:
        lines += [
            "", "At equal wall time (each method gets the milliseconds WARP-LCA used at its budget k; every "
            "method's ms / image is its median timed at the budgets, linear in between) and at equal FLOPs "
            "(cold LCA; the predictor counted):", "",
            markdown_table(
                result.equal_cost,
                ("k", "ms", "warm_energy", "cold_iterations", "cold_energy", "continuation_iterations",
                 "continuation_energy", "warm_tail_iterations", "warm_tail_energy", "mflops",
                 "cold_iterations_equal_flops", "cold_energy_equal_flops"),
                ("WARP-LCA k", "ms / image", "WARP-LCA E", "cold steps in that time", "cold E",
                 "continuation steps", "continuation E", "WARP+tail steps", "WARP+tail E", "MFLOPs / image",
                 "cold steps, equal FLOPs", "cold E, equal FLOPs"), digits=4),
        ]
        p = result.pays_until
        if math.isnan(p.get("k", math.nan)):
            lines += ["", "In wall time WARP-LCA stays below both cold baselines at every budget up to T."]
        elif p["k"] == 1:
            lines += ["", f"In wall time the warm start does not pay: already at k = 1 {CONDITIONS[p['by']]} "
                      "reaches as low an energy in the same time."]
        else:
            lines += ["", f"In wall time the warm start pays up to k = **{p['k'] - 1}** WARP-LCA steps "
                      f"({fmt(p['ms'], 3)} ms / image); from there {CONDITIONS[p['by']]} reaches as low an "
                      "energy in the same time."]
    if figure is not None:
        lines += ["", figure.link]
    return lines


def plot_baselines(result: Baselines, curves: Mapping[str, Curves], title: str) -> Any:
    """Energy against iterations (every condition) and against wall time (where timed)."""
    import matplotlib.pyplot as plt

    timed = "warm" in result.cost
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 6, 4.5), squeeze=False)
    colors = {"cold": "C0", "continuation": "C2", "warm": "C1", "warm_tail": "C3"}
    for ax, xkey in zip(axes[0], ("k", "ms"), strict=False):
        for cond, label in CONDITIONS.items():
            if cond in curves:
                e = curves[cond].energy.double().mean(1).numpy()
                k = np.arange(1, e.shape[0])
                xs = k if xkey == "k" else [ms_at(result.cost[cond], i) for i in k]
                ax.plot(xs, e[1:], color=colors[cond], label=label)
            else:
                pts = [(r["k"], r["energy"]) for r in result.rows if r["condition"] == cond]
                k, e = (np.array(v, float) for v in zip(*pts, strict=True))
                xs = k if xkey == "k" else [ms_at(result.cost[cond], i) for i in k]
                ax.plot(xs, e, "o-", color=colors[cond], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("LCA iterations" if xkey == "k" else "wall time (ms / image)")
        ax.set_ylabel("mean energy")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def baselines_metrics(prefix: str, result: Baselines) -> dict[str, float]:
    """``<prefix>/baselines/<condition>/<metric>@<k>`` and the equal-time energies."""
    out = {f"{prefix}/baselines/{r['condition']}/{m}@{r['k']}": float(r[m])
           for r in result.rows for m in ("energy", "l0", "psnr", "ssim") if m in r}
    for r in result.equal_cost:
        for key in ("cold_energy", "continuation_energy", "warm_tail_energy", "warm_energy"):
            out[f"{prefix}/equal_time/{key}@warm{r['k']}"] = float(r[key])
    if result.pays_until:
        out[f"{prefix}/equal_time/pays_until_k"] = float(result.pays_until["k"]) - 1
    return out
