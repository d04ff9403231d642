"""Experiment 1 — convergence: cold LCA vs WARP-LCA against the iteration count (README, "Experiments
and reports").

:func:`measure_convergence` runs both conditions up to T (:mod:`~warplca.evaluation.curves`) and times
them untraced through ``model(x, iters, warm)`` (warm: predictor and start guard included).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from warplca.evaluation.baselines import (
    BaselineSettings,
    baselines_markdown,
    baselines_metrics,
    budget_grid,
    measure_baselines,
    plot_baselines,
)
from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    Figure,
    clip_ks,
    describe_model,
    log_spaced_ks,
    median_ms,
    model_sentence,
    progress,
)
from warplca.evaluation.curves import (
    CURVE_METRICS,
    SPEEDUP_COLUMNS,
    Curves,
    curve_rows,
    equal_energy_speedup,
    measure,
)
from warplca.evaluation.examples import plot_atoms, plot_examples
from warplca.evaluation.experiments import EvalSession, evaluation, run_convergence
from warplca.evaluation.plots import plot_convergence, plot_speedup
from warplca.evaluation.report import fmt, markdown_table, write_result
from warplca.settings import Annotated, Checked, Doc, Ge, Gt

__all__ = [
    "ConvergenceResult", "ConvergenceSettings", "TimingSettings", "convergence_evaluation",
    "evaluate_convergence",
    "guard_sentence", "match_sentence", "measure_convergence", "speedup_display", "speedup_markdown",
    "table_markdown", "time_per_image",
]

DEFAULT_BUDGETS = (1, 10, 100, 1000)
#: the scalars of the budgets table that become metrics ``<prefix>/<method>/<metric>@<k>``
TABLE_METRICS = ("energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac", "ms_per_image")
#: the iterations-to-match keys that become metrics ``<prefix>/<key>``
MATCH_METRICS = ("iterations_to_match", "iterations_to_match_median", "matched_frac", "speedup")


@dataclass(frozen=True)
class TimingSettings(Checked):
    """Wall-clock measurement: ``images`` per timed batch, up to ``repeats`` runs per budget until a budget
    has used ``max_seconds``; the median is reported."""

    images: Annotated[int, Ge(1)] = 32
    repeats: Annotated[int, Ge(1)] = 3
    max_seconds: Annotated[float, Gt(0)] = 10.0
    enabled: bool = True


@dataclass(frozen=True)
class ExamplesSettings(Checked):
    """The example figure: ``images`` reconstructions after ``iters`` steps, cold and warm."""

    images: Annotated[int, Ge(0)] = 6
    iters: Annotated[int, Ge(1)] = 10


@dataclass(frozen=True)
class ConvergenceSettings(Checked):
    """``eval.convergence``: the curves' budgets ``ks`` (null: log-spaced up to T), timing, examples."""

    ks: Annotated[Sequence[int] | None, Ge(0), Doc("budgets of the curves (null: log-spaced up to T)")] = None
    timing: TimingSettings = TimingSettings()
    examples: ExamplesSettings = ExamplesSettings()
    baselines: BaselineSettings = BaselineSettings()


@dataclass
class ConvergenceResult(ExperimentResult):
    """:class:`ExperimentResult` plus the curves, the budgets table and iterations-to-match."""

    curves: dict[str, Curves] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    match: dict[str, Any] = field(default_factory=dict)


# -- timing --------------------------------------------------------------------------------------------
@torch.no_grad()
def time_per_image(model: EvalModel, images: Tensor, budgets: Sequence[int], settings: TimingSettings,
                   device: torch.device | None = None, show_progress: bool = True) -> dict[str, float]:
    """Median wall-clock ms per image: ``<method>@<k>`` of ``model(x, iters=k, warm=…)`` for every budget,
    ``predictor`` (the WARP-CNN alone) and ``start_guard`` (``model.guard(x, û)``; NaN without one).

    ``preprocess`` is not timed (same for both conditions); every call runs once untimed first (warm-up).
    """
    device = device or model.dictionary.weight.device
    x = model.preprocess(images[: settings.images].to(device))
    n = x.shape[0]
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bar = progress(2 * len(budgets), "timing", show_progress)
        for method in METHODS:
            model(x, iters=1, warm=method == "warm", trace=False)
            for k in budgets:
                run = lambda k=k, w=method == "warm": model(x, iters=int(k), warm=w, trace=False)  # noqa: E731
                out[f"{method}@{int(k)}"] = median_ms(run, n, settings.repeats, settings.max_seconds, device)
                bar.update(1)
        bar.close()
    model.predict_states(x)
    out["predictor"] = median_ms(lambda: model.predict_states(x), n, settings.repeats, settings.max_seconds,
                                 device)
    guard = getattr(model, "guard", None)
    out["start_guard"] = math.nan
    if callable(guard):
        u = model.predict_states(x)
        guard(x, u)
        out["start_guard"] = median_ms(lambda: guard(x, u), n, settings.repeats, settings.max_seconds, device)
    return out


# -- tables and sentences ----------------------------------------------------------------------------
def table_markdown(table: Sequence[Mapping[str, Any]], match: Mapping[str, Any] | None = None) -> str:
    """The cold LCA vs WARP-LCA table (markdown) plus the iterations-to-match sentence."""
    text = markdown_table(
        table, ("iters", "method", "energy", "psnr", "ssim", "l0", "l0_frac", "ms_per_image"),
        ("iterations", "method", "energy", "PSNR (dB)", "SSIM", "ℓ0 / image", "ℓ0 fraction", "ms / image"))
    return text + ("\n" + match_sentence(match) + "\n" if match is not None else "")


def match_sentence(match: Mapping[str, Any]) -> str:
    """One line on iterations-to-match (an :func:`~warplca.evaluation.curves.iterations_to_match` dict)."""
    t, k, frac = match["reference"], match["iterations_to_match"], 100 * match["matched_frac"]
    if math.isnan(k):
        return (f"Iterations-to-match: WARP-LCA does not reach cold LCA's mean energy at T={t} within {t} "
                f"iterations ({frac:.0f}% of images do individually).")
    return (f"Iterations-to-match: WARP-LCA reaches cold LCA's mean energy at T={t} after **{fmt(k)}** "
            f"iterations (speed-up ≈ {fmt(match['speedup'], 3)}×); per image median "
            f"{fmt(match['iterations_to_match_median'])}, {frac:.0f}% of images match within T.")


def guard_sentence(model: EvalModel, guarded: Tensor | None, guard_ms: float, pred_ms: float) -> str:
    """One line on the start guard: on/off, how often it fired, what it costs."""
    if not hasattr(model, "start_guard"):
        return "Start guard: this model has none (WARP-LCA starts from the raw prediction)."
    if not model.start_guard or guarded is None:  # type: ignore[attr-defined]
        return ("Start guard: off for this bundle (`start_guard=False`): WARP-LCA starts from the raw "
                "prediction.")
    n, fired = guarded.numel(), int(guarded.sum())
    return (f"Start guard: on; the predicted start's energy exceeded cold LCA's ½‖x‖² for **{fired} of {n}** "
            f"images ({100 * fired / max(n, 1):.1f} %), which start cold instead. It costs "
            f"{fmt(guard_ms, 3)} ms / image (the predictor alone: {fmt(pred_ms, 3)} ms / image).")


def speedup_display(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`~warplca.evaluation.curves.equal_energy_speedup` rows for tables: "never within T" as bounds
    ("> T", "> T/k", "< k/T"), finite iteration counts as integers."""
    out = []
    for row in rows:
        r = dict(row)
        total, k, warm_budget = int(row["T"]), int(row["k"]), row["budget"] == "warm"
        for key in ("warm_iterations", "cold_iterations", *(f"q{q}_iterations" for q in (25, 50, 75))):
            r[key] = f"> {total}" if math.isinf(float(r[key])) else int(r[key])
        for key in ("speedup", "q25_speedup", "q50_speedup", "q75_speedup"):
            v = float(r[key])
            if warm_budget and math.isinf(v):
                r[key] = f"> {fmt(total / k)}"
            elif not warm_budget and v == 0.0:
                r[key] = f"< {fmt(k / total)}"
        out.append(r)
    return out


def speedup_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The two equal-energy tables (WARP-LCA budgets; cold budgets) as markdown."""
    shown = speedup_display(rows)
    for r in shown:
        r["quartiles"] = " / ".join(fmt(v, 3) if isinstance(v := r[f"q{q}_speedup"], float) else str(v)
                                    for q in (25, 50, 75))
        r["never"] = f"{100 * r['never_frac']:.0f}%"
    parts = []
    for budget, counted, head, ratio, other in (
        ("warm", "cold_iterations", "WARP-LCA iterations k", "speed-up (cold / k)", "cold"),
        ("cold", "warm_iterations", "cold iterations k", "speed-up (k / warm)", "WARP-LCA"),
    ):
        mine = [r for r in shown if r["budget"] == budget]
        if mine:
            parts.append(markdown_table(
                mine, ["k", "energy", counted, "speedup", "quartiles", "never"],
                [head, "mean energy", f"{other} iterations to equal energy", ratio,
                 "per-image speed-up: 25 / 50 / 75 %", f"images {other} never reaches"], digits=4))
    return "\n".join(parts)


# -- the experiment ------------------------------------------------------------------------------------
def measure_convergence(model: EvalModel, images: Tensor, *, iters: int = 1000,
                        ks: Sequence[int] | None = None, budgets: Sequence[int] = DEFAULT_BUDGETS,
                        batch_size: int = 64, timing: TimingSettings | None = None, examples: int = 6,
                        examples_iters: int = 10, prefix: str = "convergence", name: str = "",
                        baselines: BaselineSettings | None = None, show_progress: bool = True,
                        device: torch.device | None = None) -> ConvergenceResult:
    """Cold LCA vs WARP-LCA on ``images`` ([0, 1]) up to ``iters`` = T, measured (nothing written).

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets, ms per image),
    ``<prefix>_iterations_to_match.csv`` (per image), ``<prefix>.png``, ``<prefix>_examples.png``,
    ``atoms.png``, ``speedup.csv`` / ``speedup.png`` (``<prefix>_speedup.*`` for another prefix).
    Metrics: ``<prefix>/<cold|warm>/<metric>@<k>``, ``<prefix>/iterations_to_match`` & co.,
    ``<prefix>/equal_energy/<cold|warm>_iterations@<warm|cold><k>`` and ``…/speedup@…`` (NaN: not within
    T), ``<prefix>/start_guard_frac``, ``<prefix>/start_guard_ms_per_image``. With ``baselines`` enabled
    (:mod:`~warplca.evaluation.baselines`): ``<prefix>_baselines.csv``, ``<prefix>_equal_time.csv``,
    ``<prefix>_baselines.png`` and ``<prefix>/baselines/…``, ``<prefix>/equal_time/…`` metrics.
    """
    total = int(iters)
    budgets = clip_ks(budgets, total)[1:]  # the budgets ≥ 1, T included
    keep = min(int(examples), images.shape[0])
    keep_ks = sorted({min(int(examples_iters), total), total})
    baselines = baselines if baselines is not None else BaselineSettings()
    grid = log_spaced_ks(total) if ks is None else list(ks)
    if baselines.enabled:  # the baseline budgets are checkpoints of the cold and warm curves
        grid = sorted({*grid, *(baselines.ks or budget_grid(total))})
    curves, match = measure(model, images, total, budgets, ks=grid, name=name, batch_size=batch_size,
                            keep=keep, keep_ks=keep_ks, device=device, show_progress=show_progress)
    speed = equal_energy_speedup(curves["cold"], curves["warm"])
    timing = timing or TimingSettings()
    times = time_per_image(model, images, budgets, timing, device, show_progress) if timing.enabled else {}
    pred_ms, guard_ms = times.get("predictor", math.nan), times.get("start_guard", math.nan)
    rows = curve_rows(curves)
    table = [{"iters": k, "method": METHODS[m], "key": m, **c.at(k),
              "ms_per_image": times.get(f"{m}@{k}", math.nan)} for k in budgets for m, c in curves.items()]
    cold_t, warm_t = (curves[m].at(total)["energy"] for m in METHODS)

    p = prefix
    metrics: dict[str, float] = {f"{p}/T": float(total), f"{p}/n_images": float(images.shape[0])}
    metrics.update({f"{p}/{r['key']}/{key}@{r['iters']}": float(r[key])
                    for r in table for key in TABLE_METRICS})
    metrics.update({f"{p}/{key}": float(match[key]) for key in MATCH_METRICS})
    metrics.update({f"{p}/predictor_ms_per_image": pred_ms, f"{p}/start_guard_ms_per_image": guard_ms,
                    f"{p}/start_guard_frac": curves["warm"].guard_frac})
    for row in (r for r in speed if r["k"] in budgets):  # "never within T": NaN (speedup.csv gives a bound)
        counted = f"{'cold' if row['budget'] == 'warm' else 'warm'}_iterations"
        never = math.isinf(float(row[counted]))
        for key in (counted, "speedup"):
            value = math.nan if never else float(row[key])
            metrics[f"{p}/equal_energy/{key}@{row['budget']}{row['k']}"] = value
    metrics[f"{p}/energy_ratio@T"] = warm_t / cold_t if cold_t else math.nan

    info = describe_model(model)
    h, w = images.shape[-2:]
    tau_used = model.lca.resolve_tau(h, w) if hasattr(model.lca, "resolve_tau") else info["tau"]
    title = (f"{name + ' — ' if name else ''}{images.shape[0]} images {h}×{w}, "
             f"{info['threshold']} threshold, λ={fmt(info['lam'])}")
    stem = "speedup" if prefix == "convergence" else f"{prefix}_speedup"
    figures = {"plot": Figure(f"{p}.png", "convergence curves",
                              lambda: plot_convergence(curves, title, match))}
    if keep:
        recons = {f"{METHODS[c.method]} @ {k}": c.kept[k] for k in keep_ks for c in curves.values()}
        codes = {f"Σa² {METHODS[c.method]} @ {total}": c.kept_codes[total] for c in curves.values()}
        figures["examples"] = Figure(f"{p}_examples.png", "examples",
                                     lambda: plot_examples(images[:keep], recons, codes, title))
    figures["atoms"] = Figure("atoms.png", "dictionary atoms", lambda: plot_atoms(model.dictionary.weight))
    figures["speedup_plot"] = Figure(f"{stem}.png", "equal-energy speed-up",
                                     lambda: plot_speedup(speed, f"Equal-energy speed-up — {title}"))
    fair_md: list[str] = []
    fair_csv: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    if baselines.enabled:
        fair = measure_baselines(model, images, curves, times, baselines, total=total, timed_budgets=budgets,
                                 timing=(timing.images, timing.repeats, timing.max_seconds),
                                 batch_size=batch_size, device=device, show_progress=show_progress)
        metrics.update(baselines_metrics(p, fair))
        figures["baselines"] = Figure(f"{p}_baselines.png", "cold, continuation and warm at equal cost",
                                      lambda: plot_baselines(fair, curves, f"Fair baselines — {title}"))
        fair_md = ["", *baselines_markdown(fair, baselines, figures["baselines"])]
        columns = ["condition", "method", "k", "energy", "l0", "psnr", "ssim"]
        fair_csv[f"{p}_baselines.csv"] = (columns, fair.rows)
        if fair.equal_cost:
            fair_csv[f"{p}_equal_time.csv"] = (list(fair.equal_cost[0]), fair.equal_cost)
    guard_cost = (f", and the start guard, {fmt(guard_ms, 3)} ms / image)."
                  if getattr(model, "start_guard", False) else ").")
    md = [
        f"## Convergence{': ' + name if name else ''}", "", model_sentence(model), "",
        f"{title}. Cold LCA starts from u = 0, WARP-LCA from the WARP-CNN's predicted states; both run "
        f"the same LCA (τ = {fmt(tau_used)}{' (auto)' if info['tau'] == 'auto' else ''}). "
        f"PSNR/SSIM on [0, 1] pixels; ms / image from {min(timing.images, images.shape[0])}-image batches "
        f"without tracing, median of up to {timing.repeats} repeats (WARP-LCA includes the predictor, "
        f"{fmt(pred_ms, 3)} ms / image{guard_cost}",
        "",
        table_markdown(table, match),
        f"Final energy ratio WARP-LCA / LCA at T={total}: {fmt(metrics[f'{p}/energy_ratio@T'], 6)} "
        f"(< 1: WARP-LCA settles in a lower minimum).", "",
        guard_sentence(model, curves["warm"].guarded, guard_ms, pred_ms), "",
        *(figures[k].link for k in ("plot", "examples", "atoms") if k in figures), "",
        "### Equal-energy speed-up", "",
        "From the per-iteration energy traces above: for each WARP-LCA budget k, the cold-LCA iterations "
        "that reach the same mean energy (speed-up = cold / k), and for each cold budget the WARP-LCA "
        "iterations that reach its mean energy (the row at T is iterations-to-match). Per image the same "
        f"count against each image's own energy, as 25 / 50 / 75 % quantiles of the speed-up (0: that "
        f"WARP-LCA energy is no lower than the cold start's); \"> {total}\": not reached within T = {total}.",
        "",
        speedup_markdown(speed),
        figures["speedup_plot"].link,
        *fair_md,
    ]
    per_image = [{"image": i, "k": k, "cold_energy_T": float(curves["cold"].energy[total, i])}
                 for i, k in enumerate(match["per_image"])]
    shown_speed = speedup_display(speed)
    return ConvergenceResult.from_lines(
        prefix, md, metrics=metrics, figures=figures, curves=curves, table=table, match=match,
        csv={f"{p}.csv": (["method", "k", *CURVE_METRICS], rows),
             f"{p}_table.csv": (["iters", "key", "method", *CURVE_METRICS, "ms_per_image"], table),
             f"{p}_iterations_to_match.csv": (["image", "k", "cold_energy_T"], per_image),
             f"{stem}.csv": (list(SPEEDUP_COLUMNS), shown_speed), **fair_csv},
        tables={f"{p}/curves": (["method", "k", *CURVE_METRICS], rows),
                f"{p}/table": (["iters", "method", *CURVE_METRICS, "ms_per_image"], table),
                f"{p}/speedup": (list(SPEEDUP_COLUMNS), shown_speed)})


def evaluate_convergence(model: EvalModel, images: Tensor, out_dir: str | Path,
                         **kwargs: Any) -> ConvergenceResult:
    """:func:`measure_convergence` (``kwargs``), then its CSVs, PNGs and report section into ``out_dir``."""
    result = measure_convergence(model, images, **kwargs)
    write_result(result, out_dir)
    return result


@evaluation("convergence", ConvergenceSettings)
def convergence_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=convergence``: experiment 1 on the run's model and images (settings: ``eval.convergence``)."""
    return run_convergence(session.model, session.images, session.settings, name=session.data_name,
                           show_progress=session.show_progress, device=session.device)
