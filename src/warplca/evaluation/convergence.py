"""Experiment 1 — convergence: cold LCA vs WARP-LCA against the iteration count (README, "Experiments
and reports").

For each condition (cold: u₀ = 0; warm: u₀ = WARP-CNN(x)) the solver runs **once** per batch up to
the budget T, in segments between log-spaced checkpoints k ∈ {0, 1, 2, 3, 5, 10, …, T}: each segment
restarts LCA from the previous segment's states for Δk more steps, which is step-for-step the same
computation as one long run (the Euler update only depends on u). Energy, ℓ0 and MSE come from the
solver's trace at *every* iteration; PSNR and SSIM (on [0, 1] pixels after ``postprocess``, clamped,
``data_range=1.0``) at the checkpoints, where the reconstruction is at hand.

Wall-clock time is measured separately, without tracing, through the public ``model(x, iters, warm)``
call (warm includes the predictor), as the median over repeats.

Iterations-to-match: the first k at which warm-start energy ≤ cold-start energy at T,
per image and on the mean curve; ``NaN`` when WARP-LCA never gets there within T.

Equal-energy speed-up (:func:`equal_energy_speedup`, generalising iterations-to-match to every budget):
for each WARP-LCA budget k on the grid, the cold iterations needed to reach the same mean energy, and
the ratio cold / k; for each cold budget, the WARP-LCA iterations needed. Per image the same, summarised
by quartiles. A method that never gets there within T is reported as "> T", never as a number.

Start guard: WARP-LCA's start is taken through ``model.warm_start(x)`` where the model has it
(:class:`warplca.bundle.WarpLCA`), so the curves are those of ``model(x, warm=True)``, guard included;
the fraction of images the guard sent back to the cold start and its time per image are reported.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from warplca.config_defaults import option_defaults
from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    batch_slices,
    describe_model,
    log_spaced_ks,
    model_sentence,
    normalize_ks,
    pixel_quality,
    progress,
    style_iteration_axes,
    synchronize,
    to_pixels,
)
from warplca.evaluation.examples import plot_atoms, plot_examples
from warplca.evaluation.report import fmt, markdown_table, write_csv

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ConvergenceResult",
    "Curves",
    "TimingSettings",
    "equal_energy_speedup",
    "evaluate_convergence",
    "iterations_to_match",
    "plot_convergence",
    "plot_speedup",
    "run_curves",
    "speedup_display",
    "speedup_markdown",
    "summary_rows",
    "table_markdown",
    "time_per_image",
    "warm_start",
]

#: per-k metrics in the CSV tables, in column order
CURVE_METRICS = ("energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac", "mse")
DEFAULT_BUDGETS = (1, 10, 100, 1000)


@dataclass
class Curves:
    """Per-image measurements of one condition.

    Attributes:
        method: ``cold`` or ``warm``.
        ks: checkpoints (iteration counts) where ``psnr``/``ssim`` were measured; ks[-1] = T.
        energy, l0, mse: solver trace (T + 1, N): value after k steps at row k.
        psnr, ssim: (len(ks), N) at the checkpoints.
        numel: values per image (C·H·W); code_numel: code entries per image (K·H'·W').
        kept: k -> [0, 1] reconstructions of the first images (for example figures).
        kept_codes: k -> activations of the first images.
        guarded: (N,) bool, images whose WARP-LCA start the start guard replaced by the cold start
            (warm runs of a model with a guard; None otherwise).
    """

    method: str
    ks: list[int]
    energy: Tensor
    l0: Tensor
    mse: Tensor
    psnr: Tensor
    ssim: Tensor
    numel: int
    code_numel: int
    kept: dict[int, Tensor] = field(default_factory=dict)
    kept_codes: dict[int, Tensor] = field(default_factory=dict)
    guarded: Tensor | None = None

    @property
    def total(self) -> int:
        """The budget T (last trace row)."""
        return self.energy.shape[0] - 1

    @property
    def n_images(self) -> int:
        return self.energy.shape[1]

    def at(self, k: int) -> dict[str, float]:
        """Means over images of every metric after k steps (k must be a checkpoint for PSNR/SSIM)."""
        if k not in self.ks:
            raise KeyError(f"k={k} is not one of the measured checkpoints {self.ks}")
        j = self.ks.index(k)
        e = self.energy[k]
        return {
            "energy": float(e.mean()),
            "energy_norm": float((e / self.numel).mean()),
            "psnr": float(self.psnr[j].mean()),
            "ssim": float(self.ssim[j].mean()),
            "l0": float(self.l0[k].mean()),
            "l0_frac": float((self.l0[k] / self.code_numel).mean()),
            "mse": float(self.mse[k].mean()),
        }


def _timing_default(key: str) -> Any:
    """``eval.convergence.timing.<key>`` of ``conf/eval/convergence.yaml`` (the only place it is set)."""
    return option_defaults("eval", "convergence")["convergence"]["timing"][key]


@dataclass
class TimingSettings:
    """Wall-clock measurement: ``images`` per timed batch, up to ``repeats`` runs per budget, but stop
    repeating once a budget has used ``max_seconds`` (large budgets on CPUs); the median is reported.

    A field not given takes its value from ``eval.convergence.timing`` in ``conf/eval/convergence.yaml``.
    """

    images: int = field(default_factory=lambda: int(_timing_default("images")))
    repeats: int = field(default_factory=lambda: int(_timing_default("repeats")))
    max_seconds: float = field(default_factory=lambda: float(_timing_default("max_seconds")))
    enabled: bool = field(default_factory=lambda: bool(_timing_default("enabled")))


@dataclass
class ConvergenceResult(ExperimentResult):
    """What :func:`evaluate_convergence` produced (beyond :class:`ExperimentResult`): the curves, the
    budgets table, iterations-to-match and the timings (method -> k -> ms per image)."""

    curves: dict[str, Curves] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    match: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, dict[int, float]] = field(default_factory=dict)


# -- running -------------------------------------------------------------------------------------------
def _fixed_iteration_solver(model: EvalModel) -> Any:
    """The model's LCA without early stopping (a tolerance would break the segment identity)."""
    lca = model.lca
    if getattr(lca, "tol", None) is None:
        return lca
    solver = copy.copy(lca)
    solver.tol = None
    return solver


def warm_start(model: EvalModel, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """WARP-LCA's u₀ for ``x`` (coded space) and which images the start guard sent back (None: no guard).

    ``model.warm_start`` (a :class:`warplca.bundle.WarpLCA`) gives exactly the start ``model(x)`` takes;
    models without it start from ``model.predict_states(x)``.
    """
    start = getattr(model, "warm_start", None)
    if callable(start):
        ws = start(x)
        return ws.states, ws.guarded
    return model.predict_states(x), None


@torch.no_grad()
def run_curves(
    model: EvalModel,
    images: Tensor,
    ks: Sequence[int],
    warm: bool,
    *,
    target: Tensor | None = None,
    batch_size: int = 64,
    keep: int = 0,
    keep_ks: Sequence[int] = (),
    device: torch.device | None = None,
    show_progress: bool = True,
    desc: str | None = None,
) -> Curves:
    """Run one condition on ``images`` ([0, 1], (N, C, H, W)) and measure it at every checkpoint.

    Args:
        ks: checkpoints; 0 and T = max(ks) are added. One solver run per batch, in segments.
        warm: start from WARP-LCA's u₀ (:func:`warm_start`: the prediction, guarded) instead of zeros.
        target: clean images for PSNR/SSIM (default: ``images``; denoising passes the clean ones).
        keep, keep_ks: keep reconstructions and codes of the first ``keep`` images at ``keep_ks``.
    """
    ks = normalize_ks(ks, max(ks))
    total = ks[-1]
    target = images if target is None else target
    if target.shape != images.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from images {tuple(images.shape)}")
    device = device or model.dictionary.weight.device
    solver = _fixed_iteration_solver(model)
    n = images.shape[0]
    energy, l0, mse, psnr, ssim = [], [], [], [], []
    guarded: list[Tensor] = []
    kept: dict[int, list[Tensor]] = {k: [] for k in keep_ks}
    kept_codes: dict[int, list[Tensor]] = {k: [] for k in keep_ks}
    method = "warm" if warm else "cold"
    bar = progress(total * n, desc or f"{METHODS[method]}: {total} iterations", show_progress)
    numel = code_numel = 0
    try:
        for sl in batch_slices(n, batch_size):
            img = images[sl].to(device)
            tgt = target[sl]
            x = model.preprocess(img)
            u = None
            if warm:
                u, fired = warm_start(model, x)
                if fired is not None:
                    guarded.append(fired.detach().to("cpu", torch.bool))
            segs: dict[str, list[Tensor]] = {"energy": [], "l0": [], "mse": []}
            q_psnr, q_ssim = [], []
            prev = 0
            for k in ks:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the τ < L warning repeats on every segment
                    res = solver(x, iters=k - prev, u0=u, trace=True)
                first = 0 if k == 0 else 1  # row 0 of a segment repeats the previous segment's last row
                for key in segs:
                    segs[key].append(res.trace[key][first:].detach().to("cpu", torch.float64))
                pixels = to_pixels(model, res.recon, img)
                p, s = pixel_quality(pixels, tgt)
                q_psnr.append(p)
                q_ssim.append(s)
                if k in kept and sl.start < keep:
                    m = min(keep, sl.stop) - sl.start
                    kept[k].append(pixels[:m].cpu())
                    kept_codes[k].append(res.a[:m].detach().cpu())
                bar.update((k - prev) * img.shape[0])
                u = res.u
                prev = k
            energy.append(torch.cat(segs["energy"]))
            l0.append(torch.cat(segs["l0"]))
            mse.append(torch.cat(segs["mse"]))
            psnr.append(torch.stack(q_psnr))
            ssim.append(torch.stack(q_ssim))
            numel = int(img[0].numel())
            code_numel = int(res.a[0].numel())
    finally:
        bar.close()
    return Curves(
        method=method,
        ks=ks,
        energy=torch.cat(energy, 1),
        l0=torch.cat(l0, 1),
        mse=torch.cat(mse, 1),
        psnr=torch.cat(psnr, 1).to(torch.float64),
        ssim=torch.cat(ssim, 1).to(torch.float64),
        numel=numel,
        code_numel=code_numel,
        kept={k: torch.cat(v) for k, v in kept.items() if v},
        kept_codes={k: torch.cat(v) for k, v in kept_codes.items() if v},
        guarded=torch.cat(guarded) if guarded and len(guarded) == len(energy) else None,
    )


def measure(
    model: EvalModel,
    images: Tensor,
    total: int,
    budgets: Sequence[int] = (),
    *,
    target: Tensor | None = None,
    batch_size: int = 64,
    keep: int = 0,
    keep_ks: Sequence[int] = (),
    device: torch.device | None = None,
    show_progress: bool = True,
    name: str = "",
    ks: Sequence[int] | None = None,
) -> tuple[dict[str, Curves], dict[str, Any]]:
    """Cold and warm :class:`Curves` on the checkpoints ``ks`` (default: the log grid) plus ``budgets``
    up to ``total``, and their iterations-to-match. The building block of every experiment."""
    base = log_spaced_ks(total) if ks is None else [int(k) for k in ks if 0 <= int(k) <= total]
    grid = normalize_ks(
        base
        + [int(b) for b in budgets if 0 <= int(b) <= total]
        + [int(k) for k in keep_ks if 0 <= int(k) <= total],
        total,
    )
    curves = {
        method: run_curves(
            model,
            images,
            grid,
            warm=(method == "warm"),
            target=target,
            batch_size=batch_size,
            keep=keep,
            keep_ks=keep_ks,
            device=device,
            show_progress=show_progress,
            desc=f"{name + ': ' if name else ''}{METHODS[method]} ×{total}",
        )
        for method in ("cold", "warm")
    }
    return curves, iterations_to_match(curves["cold"], curves["warm"], total)


def iterations_to_match(cold: Curves, warm: Curves, total: int | None = None) -> dict[str, Any]:
    """First k with warm energy ≤ cold energy at T, on the mean curve and per image.

    Returns ``mean`` (k on the mean curves, NaN if never), ``per_image`` (N floats, NaN if never),
    ``median`` (over images; NaN counts as "never", so the median is NaN when fewer than half match),
    ``matched_frac`` and ``speedup`` = T / mean.
    """
    total = cold.total if total is None else int(total)
    if total > cold.total:
        raise ValueError(f"reference budget T={total} exceeds the cold run's {cold.total} iterations")
    ref = cold.energy[total]  # (N,)
    ok = warm.energy <= ref.unsqueeze(0)  # (T_w + 1, N)
    hit = ok.any(0)
    first = torch.where(hit, ok.to(torch.int8).argmax(0).to(torch.float64), torch.full_like(ref, math.nan))
    mean_ok = warm.energy.mean(1) <= ref.mean()
    k_mean = float(mean_ok.to(torch.int8).argmax()) if bool(mean_ok.any()) else math.nan
    per_image = first.tolist()
    ordered = sorted(per_image, key=lambda v: math.inf if math.isnan(v) else v)
    med = ordered[(len(ordered) - 1) // 2] if ordered else math.nan
    return {
        "reference": total,
        "mean": k_mean,
        "per_image": per_image,
        "median": med,
        "matched_frac": float(hit.to(torch.float64).mean()),
        "speedup": total / max(k_mean, 1.0) if not math.isnan(k_mean) else math.nan,
    }


#: per-image quantiles of the equal-energy speed-up (nearest rank, as the iterations-to-match median)
SPEEDUP_QUANTILES = (0.25, 0.5, 0.75)
SPEEDUP_COLUMNS = (
    "budget", "k", "energy", "warm_iterations", "cold_iterations", "speedup",
    "q25_iterations", "q50_iterations", "q75_iterations", "q25_speedup", "q50_speedup", "q75_speedup",
    "never_frac", "T",
)


def _first_reach(trace: Tensor, targets: Tensor) -> Tensor:
    """First row j of ``trace`` (T + 1, …) with trace[j] ≤ target, for targets (M, …); inf where none."""
    ok = trace.unsqueeze(0) <= targets.unsqueeze(1)  # (M, T + 1, …)
    first = ok.to(torch.int8).argmax(1).to(torch.float64)
    return torch.where(ok.any(1), first, torch.full_like(first, math.inf))


def _nearest_rank(values: Tensor, q: float) -> float:
    """The nearest-rank q-quantile of ``values`` (inf sorts last; no interpolation across "never")."""
    ordered = torch.sort(values.flatten()).values
    return float(ordered[max(0, math.ceil(q * ordered.numel()) - 1)]) if ordered.numel() else math.nan


def equal_energy_speedup(cold: Curves, warm: Curves, ks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Equal-energy iterations of cold LCA and WARP-LCA from their per-iteration energy traces (pure).

    For every budget k of ``ks`` (default: the warm curves' checkpoints), two kinds of rows:

    - ``budget="warm"``: the mean WARP-LCA energy after k iterations and ``cold_iterations``, the first
      iteration at which cold LCA's mean energy is ≤ it; ``speedup`` = cold_iterations / k (NaN at k = 0,
      where the row says what the start alone is worth in cold iterations).
    - ``budget="cold"`` (k ≥ 1): the mean cold energy after k iterations and ``warm_iterations`` to reach
      it; ``speedup`` = k / max(warm_iterations, 1) (a start already below counts as one iteration, as
      in :func:`iterations_to_match`, which is this row at k = T).

    Per image the same first-reach count against the image's own energy gives nearest-rank quartiles
    ``q25/q50/q75_iterations`` and ``q25/q50/q75_speedup`` (the speed-up quartiles of the images), and
    ``never_frac``, the fraction of images the other method does not reach within T. A count that is
    never reached within T is ``math.inf``; its speed-up is ``inf`` (warm budget: the true ratio is
    above T/k) or ``0.0`` (cold budget: below k/T) — :func:`speedup_display` shows them as bounds.
    A warm-budget count of 0 (speed-up 0) means WARP-LCA after k iterations is no lower than the cold
    start itself (e.g. both still on the hard threshold's plateau at ½‖x‖²).
    """
    total = min(cold.total, warm.total)
    grid = sorted({int(k) for k in (warm.ks if ks is None else ks) if 0 <= int(k) <= total})
    ce, we = cold.energy[: total + 1].double(), warm.energy[: total + 1].double()
    rows: list[dict[str, Any]] = []
    for budget, given, other in (("warm", we, ce), ("cold", ce, we)):
        kk = [k for k in grid if budget == "warm" or k >= 1]
        if not kk:
            continue
        idx = torch.tensor(kk)
        mean_iters = _first_reach(other.mean(1), given.mean(1)[idx])  # (K,)
        image_iters = _first_reach(other, given[idx])  # (K, N)
        for j, k in enumerate(kk):
            it = float(mean_iters[j])
            per_image = image_iters[j]
            qs = [_nearest_rank(per_image, q) for q in SPEEDUP_QUANTILES]
            if budget == "warm":
                ratio = (lambda c, k=k: c / k if k else math.nan)
                pair = {"warm_iterations": k, "cold_iterations": it}
                q_speed = [ratio(v) for v in qs]
            else:
                ratio = (lambda w, k=k: k / max(w, 1.0))
                pair = {"warm_iterations": it, "cold_iterations": k}
                q_speed = [ratio(v) for v in reversed(qs)]  # more iterations: smaller speed-up
            rows.append({
                "budget": budget,
                "k": k,
                "energy": float(given[k].mean()),
                **pair,
                "speedup": ratio(it),
                **{f"q{round(100 * q)}_iterations": v for q, v in zip(SPEEDUP_QUANTILES, qs, strict=True)},
                **{f"q{round(100 * q)}_speedup": v for q, v in zip(SPEEDUP_QUANTILES, q_speed, strict=True)},
                "never_frac": float(torch.isinf(per_image).double().mean()),
                "T": total,
            })
    return rows


def speedup_display(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`equal_energy_speedup` rows for tables: "never within T" as bounds ("> T", "> T/k", "< k/T"),
    finite iteration counts as integers."""
    out = []
    for row in rows:
        r = dict(row)
        total, k, warm_budget = int(row["T"]), int(row["k"]), row["budget"] == "warm"
        counts = ("warm_iterations", "cold_iterations", "q25_iterations", "q50_iterations", "q75_iterations")
        for key in counts:
            v = float(r[key])
            r[key] = f"> {total}" if math.isinf(v) else int(v)
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
    warm = [r for r in shown if r["budget"] == "warm"]
    cold = [r for r in shown if r["budget"] == "cold"]
    for r in (*warm, *cold):
        r["quartiles"] = " / ".join(fmt(r[f"q{q}_speedup"], 3) if isinstance(r[f"q{q}_speedup"], float)
                                    else str(r[f"q{q}_speedup"]) for q in (25, 50, 75))
        r["never"] = f"{100 * r['never_frac']:.0f}%"
    parts = []
    if warm:
        parts.append(markdown_table(
            warm, ["k", "energy", "cold_iterations", "speedup", "quartiles", "never"],
            ["WARP-LCA iterations k", "mean energy", "cold iterations to equal energy", "speed-up (cold / k)",
             "per-image speed-up: 25 / 50 / 75 %", "images cold never reaches"], digits=4))
    if cold:
        parts.append(markdown_table(
            cold, ["k", "energy", "warm_iterations", "speedup", "quartiles", "never"],
            ["cold iterations k", "mean energy", "WARP-LCA iterations to equal energy", "speed-up (k / warm)",
             "per-image speed-up: 25 / 50 / 75 %", "images WARP-LCA never reaches"], digits=4))
    return "\n".join(parts)


@torch.no_grad()
def time_per_image(
    model: EvalModel,
    images: Tensor,
    budgets: Sequence[int],
    warm: bool,
    settings: TimingSettings | None = None,
    device: torch.device | None = None,
    show_progress: bool = True,
) -> dict[int, float]:
    """Median wall-clock milliseconds per image of ``model(x, iters=k, warm=warm)`` for each budget k.

    Runs without the trace; ``warm`` includes the predictor. Images go through ``preprocess`` first
    (not timed: it is the same for both conditions).
    """
    settings = settings or TimingSettings()
    device = device or model.dictionary.weight.device
    x = model.preprocess(images[: settings.images].to(device))
    b = x.shape[0]
    out: dict[int, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x, iters=1, warm=warm, trace=False)  # warm-up: allocations, operator-norm cache, kernels
        bar = progress(len(budgets), f"timing {METHODS['warm' if warm else 'cold']}", show_progress)
        for k in budgets:
            times: list[float] = []
            while len(times) < max(1, settings.repeats):
                synchronize(device)
                t0 = time.perf_counter()
                model(x, iters=int(k), warm=warm, trace=False)
                synchronize(device)
                times.append(time.perf_counter() - t0)
                if sum(times) >= settings.max_seconds:
                    break
            out[int(k)] = 1000.0 * statistics.median(times) / b
            bar.update(1)
        bar.close()
    return out


@torch.no_grad()
def predictor_ms(
    model: EvalModel, images: Tensor, settings: TimingSettings, device: torch.device | None = None
) -> float:
    """Median milliseconds per image of the WARP-CNN forward pass alone."""
    device = device or model.dictionary.weight.device
    x = model.preprocess(images[: settings.images].to(device))
    model.predict_states(x)
    times = []
    for _ in range(max(1, settings.repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        model.predict_states(x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / x.shape[0]


@torch.no_grad()
def start_guard_ms(
    model: EvalModel, images: Tensor, settings: TimingSettings, device: torch.device | None = None
) -> float:
    """Median milliseconds per image of the start guard alone (``model.guard(x, û)`` on given
    predictions: the energy of the predicted start and of the cold start); NaN for models without one."""
    guard = getattr(model, "guard", None)
    if not callable(guard):
        return math.nan
    device = device or model.dictionary.weight.device
    x = model.preprocess(images[: settings.images].to(device))
    u = model.predict_states(x)
    guard(x, u)
    times = []
    for _ in range(max(1, settings.repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        guard(x, u)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / x.shape[0]


# -- tables --------------------------------------------------------------------------------------------
def curve_rows(curves: Mapping[str, Curves], extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (method, checkpoint k) with the means of every metric (the ``convergence.csv``)."""
    rows = []
    for method, c in curves.items():
        for k in c.ks:
            rows.append({**(extra or {}), "method": method, "k": k, **c.at(k)})
    return rows


def summary_rows(
    curves: Mapping[str, Curves],
    budgets: Sequence[int],
    timing: Mapping[str, Mapping[int, float]] | None = None,
) -> list[dict[str, Any]]:
    """Table rows at the budgets: iterations, method, energy, PSNR, SSIM, ℓ0, ms per image."""
    rows = []
    for k in budgets:
        for method, c in curves.items():
            row = {"iters": k, "method": METHODS.get(method, method), "key": method, **c.at(k)}
            row["ms_per_image"] = (timing or {}).get(method, {}).get(k, math.nan)
            rows.append(row)
    return rows


TABLE_COLUMNS = ("iters", "method", "energy", "psnr", "ssim", "l0", "l0_frac", "ms_per_image")
TABLE_HEADERS = (
    "iterations",
    "method",
    "energy",
    "PSNR (dB)",
    "SSIM",
    "ℓ0 / image",
    "ℓ0 fraction",
    "ms / image",
)


def table_markdown(table: Sequence[Mapping[str, Any]], match: Mapping[str, Any] | None = None) -> str:
    """The cold LCA vs WARP-LCA table (markdown) plus the iterations-to-match sentence."""
    text = markdown_table(table, TABLE_COLUMNS, TABLE_HEADERS)
    if match is not None:
        text += "\n" + match_sentence(match) + "\n"
    return text


def match_sentence(match: Mapping[str, Any]) -> str:
    """One line on iterations-to-match."""
    t = match["reference"]
    if math.isnan(match["mean"]):
        return (
            f"Iterations-to-match: WARP-LCA does not reach cold LCA's mean energy at T={t} within {t} "
            f"iterations ({100 * match['matched_frac']:.0f}% of images do individually)."
        )
    return (
        f"Iterations-to-match: WARP-LCA reaches cold LCA's mean energy at T={t} after "
        f"**{fmt(match['mean'])}** iterations (speed-up ≈ {fmt(match['speedup'], 3)}×); per image median "
        f"{fmt(match['median'])}, {100 * match['matched_frac']:.0f}% of images match within T."
    )


def guard_sentence(model: EvalModel, guarded: Tensor | None, guard_ms: float, pred_ms: float) -> str:
    """One line on the start guard: on/off, how often it fired, what it costs."""
    if not hasattr(model, "start_guard"):
        return "Start guard: this model has none (WARP-LCA starts from the raw prediction)."
    if not model.start_guard or guarded is None:  # type: ignore[attr-defined]
        return ("Start guard: off for this bundle (`start_guard=False`): WARP-LCA starts from the raw "
                "prediction.")
    n, fired = guarded.numel(), int(guarded.sum())
    return (
        f"Start guard: on; the predicted start's energy exceeded cold LCA's ½‖x‖² for **{fired} of {n}** "
        f"images ({100 * fired / max(n, 1):.1f} %), which start cold instead. It costs "
        f"{fmt(guard_ms, 3)} ms / image (the predictor alone: {fmt(pred_ms, 3)} ms / image)."
    )


# -- figures -------------------------------------------------------------------------------------------
def plot_convergence(
    curves: Mapping[str, Curves], title: str = "", match: Mapping[str, Any] | None = None
) -> Any:
    """2×2 figure: energy, PSNR, SSIM and ℓ0 (means over images) against iterations, log x."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = {"cold": "tab:blue", "warm": "tab:orange"}
    for method, c in curves.items():
        it = torch.arange(1, c.total + 1).numpy()
        label = METHODS.get(method, method)
        color = colors.get(method)
        axes[0, 0].plot(it, c.energy[1:].mean(1).numpy(), label=label, color=color)
        ks = [k for k in c.ks if k >= 1]
        idx = [c.ks.index(k) for k in ks]
        axes[0, 1].plot(ks, c.psnr[idx].mean(1).numpy(), "o-", ms=3, label=label, color=color)
        axes[1, 0].plot(ks, c.ssim[idx].mean(1).numpy(), "o-", ms=3, label=label, color=color)
        axes[1, 1].plot(it, c.l0[1:].mean(1).numpy(), label=label, color=color)
    if "cold" in curves:
        ref = float(curves["cold"].energy[-1].mean())
        axes[0, 0].axhline(ref, color="gray", ls=":", lw=1, label=f"cold energy at T={curves['cold'].total}")
    if match is not None and not math.isnan(match["mean"]) and match["mean"] >= 1:
        axes[0, 0].axvline(
            match["mean"],
            color="tab:green",
            ls="--",
            lw=1,
            label=f"iterations-to-match = {int(match['mean'])}",
        )
    labels = [
        ("energy (mean per image)", "Energy ½‖x − Φa‖² + ΣP(a)"),
        ("PSNR (dB)", "PSNR vs clean image"),
        ("SSIM", "SSIM vs clean image"),
        ("active coefficients ℓ0 per image", "Sparsity"),
    ]
    style_iteration_axes(((ax, ylabel, sub) for ax, (ylabel, sub) in zip(axes.flat, labels, strict=True)),
                         legend_size=8)
    energies = torch.cat([c.energy[1:].mean(1) for c in curves.values()])
    if bool((energies > 0).all()) and float(energies.max() / energies.min()) > 20:
        axes[0, 0].set_yscale("log")
    fig.suptitle(title or "Cold LCA vs WARP-LCA")
    fig.tight_layout()
    return fig


def plot_speedup(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Equal-energy iterations, log–log: x = WARP-LCA iterations, y = cold iterations to the same mean energy.

    The line is the warm-budget rows (mean curves) with the per-image 25–75 % band; the hollow squares
    are the cold-budget rows (x = WARP-LCA iterations to reach cold's energy at y); the dotted diagonals
    mark speed-ups 1×, 10×, 100×. "Never within T" is drawn at T with a triangle pointing out of the plot.
    """
    import matplotlib.pyplot as plt

    warm = [r for r in rows if r["budget"] == "warm" and int(r["k"]) >= 1]
    cold = [r for r in rows if r["budget"] == "cold"]
    total = int(rows[0]["T"]) if rows else 1
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    clip = lambda v: min(max(float(v), 1.0), float(total))  # noqa: E731 - the log axes span [1, T]
    if warm:
        ks = [int(r["k"]) for r in warm]
        lo = [clip(r["q25_iterations"]) for r in warm]
        hi = [clip(r["q75_iterations"]) for r in warm]
        ax.fill_between(ks, lo, hi, color="tab:orange", alpha=0.2, lw=0,
                        label="per image: 25–75 % (clipped to [1, T])")
        ok = [(int(r["k"]), float(r["cold_iterations"])) for r in warm
              if 1 <= float(r["cold_iterations"]) < math.inf]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o-", color="tab:orange", ms=4,
                    label="WARP-LCA budget k → cold iterations (mean energy)")
        never = [int(r["k"]) for r in warm if math.isinf(float(r["cold_iterations"]))]
        if never:
            ax.plot(never, [total] * len(never), "^", color="tab:red", ms=8,
                    label=f"cold LCA never reaches it within T = {total}")
    if cold:
        pts = [(clip(r["warm_iterations"]), int(r["k"])) for r in cold
               if math.isfinite(float(r["warm_iterations"]))]
        if pts:
            ax.plot(*zip(*pts, strict=True), "s", mfc="none", color="tab:blue", ms=6,
                    label="cold budget → WARP-LCA iterations (mean energy; 0 drawn at 1)")
        never = [int(r["k"]) for r in cold if math.isinf(float(r["warm_iterations"]))]
        if never:
            ax.plot([total] * len(never), never, ">", color="tab:purple", ms=8,
                    label=f"WARP-LCA never reaches it within T = {total}")
    span = [1.0, float(total)]
    for factor, style in ((1, ":"), (10, "--"), (100, "--")):
        alpha = 0.8 if factor == 1 else 0.4
        ax.plot(span, [v * factor for v in span], style, color="gray", lw=0.8, alpha=alpha)
        if factor * 1.0 <= total:
            ax.annotate(f"{factor}×" if factor > 1 else "1× (y = x)", (1.05, factor * 1.05), color="gray",
                        fontsize=8)
    ax.axhline(total, color="gray", lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, total * 1.25)
    ax.set_ylim(0.8, total * 1.6)
    ax.set_xlabel("WARP-LCA iterations k")
    ax.set_ylabel("cold LCA iterations to the same mean energy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # below y = x: WARP-LCA slower than cold, rarely any data
    ax.set_title(title or "Equal-energy speed-up of WARP-LCA over cold LCA", fontsize=10)
    fig.tight_layout()
    return fig


# -- the experiment ------------------------------------------------------------------------------------
def evaluate_convergence(
    model: EvalModel,
    images: Tensor,
    out_dir: str | Path,
    *,
    iters: int = 1000,
    ks: Sequence[int] | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    batch_size: int = 64,
    timing: TimingSettings | None = None,
    examples: int = 6,
    examples_iters: int = 10,
    prefix: str = "convergence",
    name: str = "",
    show_progress: bool = True,
    write_files: bool = True,
    device: torch.device | None = None,
) -> ConvergenceResult:
    """Cold LCA vs WARP-LCA on ``images`` ([0, 1]) up to ``iters`` = T; writes CSVs and PNGs.

    Files (in ``out_dir``, names prefixed by ``prefix``): ``<prefix>.csv`` (means at every checkpoint),
    ``<prefix>_table.csv`` (the budgets table with ms per image), ``<prefix>_iterations_to_match.csv`` (per
    image), ``<prefix>.png``, ``<prefix>_examples.png``, ``atoms.png``, and the equal-energy speed-up
    ``speedup.csv`` / ``speedup.png`` (``<prefix>_speedup.*`` for another prefix). Returns flat metrics keyed
    ``<prefix>/<cold|warm>/<metric>@<k>`` plus ``<prefix>/iterations_to_match`` & co.,
    ``<prefix>/equal_energy/<cold|warm>_iterations@<warm|cold><k>`` and ``…/speedup@<warm|cold><k>`` (NaN:
    not reached within T), ``<prefix>/start_guard_frac`` and ``<prefix>/start_guard_ms_per_image``.
    """
    from warplca.plotting import save_png

    out_dir = Path(out_dir)
    total = int(iters)
    budgets = sorted({int(b) for b in budgets if 1 <= int(b) <= total} | {total})
    examples_iters = min(int(examples_iters), total)
    keep = min(int(examples), images.shape[0])
    keep_ks = sorted({examples_iters, total})
    curves, match = measure(
        model,
        images,
        total,
        budgets,
        batch_size=batch_size,
        keep=keep,
        keep_ks=keep_ks,
        device=device,
        show_progress=show_progress,
        name=name,
        ks=ks,
    )
    speed = equal_energy_speedup(curves["cold"], curves["warm"])
    timing = timing or TimingSettings()
    times: dict[str, dict[int, float]] = {}
    pred_ms = guard_ms = math.nan
    if timing.enabled:
        times = {
            m: time_per_image(
                model,
                images,
                budgets,
                warm=(m == "warm"),
                settings=timing,
                device=device,
                show_progress=show_progress,
            )
            for m in ("cold", "warm")
        }
        pred_ms = predictor_ms(model, images, timing, device)
        guard_ms = start_guard_ms(model, images, timing, device)
    rows = curve_rows(curves)
    table = summary_rows(curves, budgets, times)

    metrics: dict[str, float] = {f"{prefix}/T": float(total), f"{prefix}/n_images": float(images.shape[0])}
    for row in table:
        for key in ("energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac", "ms_per_image"):
            metrics[f"{prefix}/{row['key']}/{key}@{row['iters']}"] = float(row[key])
    metrics[f"{prefix}/iterations_to_match"] = match["mean"]
    metrics[f"{prefix}/iterations_to_match_median"] = match["median"]
    metrics[f"{prefix}/matched_frac"] = match["matched_frac"]
    metrics[f"{prefix}/speedup"] = match["speedup"]
    metrics[f"{prefix}/predictor_ms_per_image"] = pred_ms
    metrics[f"{prefix}/start_guard_ms_per_image"] = guard_ms
    guarded = curves["warm"].guarded
    metrics[f"{prefix}/start_guard_frac"] = math.nan if guarded is None else float(guarded.double().mean())
    for row in speed:  # "never within T" is NaN here, as for iterations-to-match; speedup.csv gives the bound
        if row["k"] in budgets:
            other = "cold" if row["budget"] == "warm" else "warm"
            never = math.isinf(float(row[f"{other}_iterations"]))
            key = f"{row['budget']}{row['k']}"
            metrics[f"{prefix}/equal_energy/{other}_iterations@{key}"] = (
                math.nan if never else float(row[f"{other}_iterations"])
            )
            metrics[f"{prefix}/equal_energy/speedup@{key}"] = math.nan if never else float(row["speedup"])
    cold_t, warm_t = curves["cold"].at(total), curves["warm"].at(total)
    metrics[f"{prefix}/energy_ratio@T"] = (
        warm_t["energy"] / cold_t["energy"] if cold_t["energy"] else math.nan
    )

    files: dict[str, Path] = {}
    info = describe_model(model)
    h, w = images.shape[-2:]
    tau_used = model.lca.resolve_tau(h, w) if hasattr(model.lca, "resolve_tau") else info["tau"]
    title = (
        f"{name + ' — ' if name else ''}{images.shape[0]} images {h}×{w}, {info['threshold']} threshold, "
        f"λ={fmt(info['lam'])}"
    )
    if write_files:
        files["csv"] = write_csv(out_dir / f"{prefix}.csv", rows, ["method", "k", *CURVE_METRICS])
        files["table"] = write_csv(
            out_dir / f"{prefix}_table.csv", table, ["iters", "key", "method", *CURVE_METRICS, "ms_per_image"]
        )
        files["match"] = write_csv(
            out_dir / f"{prefix}_iterations_to_match.csv",
            [
                {"image": i, "k": k, "cold_energy_T": float(curves["cold"].energy[total, i])}
                for i, k in enumerate(match["per_image"])
            ],
            ["image", "k", "cold_energy_T"],
        )
        files["plot"] = save_png(plot_convergence(curves, title, match), out_dir / f"{prefix}.png")
        if keep:
            cold, warm = curves["cold"], curves["warm"]
            recons = {f"{METHODS[c.method]} @ {k}": c.kept[k] for k in keep_ks for c in (cold, warm)}
            codes = {f"Σa² {METHODS[c.method]} @ {total}": c.kept_codes[total] for c in (cold, warm)}
            files["examples"] = save_png(
                plot_examples(images[:keep], recons, codes, title), out_dir / f"{prefix}_examples.png"
            )
        files["atoms"] = save_png(plot_atoms(model.dictionary.weight), out_dir / "atoms.png")
        stem = "speedup" if prefix == "convergence" else f"{prefix}_speedup"
        files["speedup"] = write_csv(out_dir / f"{stem}.csv", speedup_display(speed), SPEEDUP_COLUMNS)
        files["speedup_plot"] = save_png(
            plot_speedup(speed, f"Equal-energy speed-up — {title}"), out_dir / f"{stem}.png"
        )

    md = [
        f"## Convergence{': ' + name if name else ''}",
        "",
        model_sentence(model),
        "",
        f"{title}. Cold LCA starts from u = 0, WARP-LCA from the WARP-CNN's predicted states; both run "
        f"the same LCA (τ = {fmt(tau_used)}{' (auto)' if info['tau'] == 'auto' else ''}). "
        f"PSNR/SSIM on [0, 1] pixels; ms / image from "
        f"{min(timing.images, images.shape[0])}-image batches without tracing, median of up to "
        f"{timing.repeats} repeats (WARP-LCA includes the predictor, {fmt(pred_ms, 3)} ms / image"
        + (f", and the start guard, {fmt(guard_ms, 3)} ms / image)." if getattr(model, "start_guard", False)
           else ")."),
        "",
        table_markdown(table, match),
        f"Final energy ratio WARP-LCA / LCA at T={total}: {fmt(metrics[f'{prefix}/energy_ratio@T'], 6)} "
        f"(< 1: WARP-LCA settles in a lower minimum).",
        "",
        guard_sentence(model, guarded, guard_ms, pred_ms),
        "",
    ]
    for key, label in (
        ("plot", "convergence curves"),
        ("examples", "examples"),
        ("atoms", "dictionary atoms"),
    ):
        if key in files:
            md.append(f"![{label}]({files[key].name})")
    md += [
        "",
        "### Equal-energy speed-up",
        "",
        "From the per-iteration energy traces above: for each WARP-LCA budget k, the cold-LCA iterations "
        "that reach the same mean energy (speed-up = cold / k), and for each cold budget the WARP-LCA "
        "iterations that reach its mean energy (the row at T is iterations-to-match). Per image the same "
        f"count against each image's own energy, as 25 / 50 / 75 % quantiles of the speed-up (0: that "
        f"WARP-LCA energy is no lower than the cold start's); \"> {total}\": not reached within T = {total}.",
        "",
        speedup_markdown(speed),
    ]
    if "speedup_plot" in files:
        md.append(f"![equal-energy speed-up]({files['speedup_plot'].name})")
    tables = {
        f"{prefix}/curves": (["method", "k", *CURVE_METRICS], rows),
        f"{prefix}/table": (["iters", "method", *CURVE_METRICS, "ms_per_image"], table),
        f"{prefix}/speedup": (list(SPEEDUP_COLUMNS), speedup_display(speed)),
    }
    return ConvergenceResult(
        name=prefix,
        metrics=metrics,
        markdown="\n".join(md) + "\n",
        files=files,
        tables=tables,
        curves=curves,
        table=table,
        match=match,
        timing=times,
    )
