"""Stage "scaling": the warm start's scaling law, compute-controlled and tested by prediction.

A grid of training-set sizes n (nested, seeded samples stratified by photo × scale:
:func:`~warplca.tasks.stage_learning_curve.nested_order`) × predictors of different capacity, every point
trained afresh for the **same number of optimiser steps** (cosine over the steps), plus a
``long_factor``× steps level at a few sizes (data vs compute), and several seeds for some predictors.

The quantity, fixed before any fit (:mod:`warplca.evaluation.scaling_law`): per image the relative energy
gap g_k = (E_k − E_ref)/E_ref after k ∈ ``ks`` WARP-LCA steps, E_ref the lowest energy known for that
image (cold and λ-continuation LCA run for ``reference_iters`` steps, every point's warm run at T).
Scored on ``study.split`` (val) and on crops of the OOD photos of ``eval=ood`` (photos of other scenes);
also the predictor's relative state error on cached val targets and iterations-to-match per image
(censored at T; Kaplan–Meier median).

Writes ``scaling.md`` / ``scaling.png`` / ``scaling_fit.json`` and, last, ``scaling.csv`` (the artifact).
Scored points stay in ``scaling.partial.json``: an interrupted grid resumes, and a grid grown or cut
(:data:`GRID_SELECTORS`; ``force=true``) trains only the points it has not scored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from warplca.bundle import WarpLCA
from warplca.evaluation.curves import Curves, iterations_to_match, run_curves
from warplca.evaluation.ood import PHOTOS, match_channels, photo_crops
from warplca.evaluation.report import fmt, markdown_table, write_csv
from warplca.evaluation.scaling_law import (
    PowerLaw,
    bootstrap_fits,
    fit_power_law,
    kaplan_meier,
    log_log_map,
    relative_gap,
)
from warplca.evaluation.warm_start_study import score_curves
from warplca.lca.continuation import Continuation, solve_continuation
from warplca.serialization import write_text_atomic
from warplca.source import stamp
from warplca.tasks.context import RunContext
from warplca.tasks.predictor_fit import target_sets
from warplca.tasks.stage_learning_curve import nested_order
from warplca.tasks.study import Study

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "analyse", "point_grid", "run"]

ARTIFACT = "scaling.csv"
#: settings that only choose grid points or shape the fit: changing them keeps the points already scored
#: (``scaling.partial.json``), so a grid can grow, or be cut to the finished points to publish early
GRID_SELECTORS = ("sizes", "seeds", "seeded", "long_factor", "long_sizes", "long_predictor", "holdout",
                  "bootstrap")


@dataclass
class ScoreSet:
    """Images a point is scored on, their photo groups and per-image references."""

    name: str
    images: torch.Tensor
    groups: np.ndarray
    cold: Curves
    cold_long: np.ndarray
    continuation_long: np.ndarray


def point_grid(conf: Mapping[str, Any], n_cached: int) -> list[dict[str, Any]]:
    """The grid's points (``predictor``, ``size``, ``seed``, ``steps``): per seed, each predictor's sizes
    (smallest first), then the long level (largest first: its most informative point)."""
    sizes = sorted({min(int(s), n_cached) for s in conf["sizes"]})
    seeds = [int(s) for s in conf["seeds"]]
    points = []
    for seed in seeds:
        for name in conf["predictors"]:
            if seed != seeds[0] and name not in conf["seeded"]:
                continue
            steps = int(conf["steps"])
            points += [{"predictor": name, "size": n, "seed": seed, "steps": steps} for n in sizes]
        if seed == seeds[0]:
            long_steps = int(conf["steps"]) * int(conf["long_factor"])
            if long_steps != int(conf["steps"]):
                points += [{"predictor": conf["long_predictor"], "size": min(int(n), n_cached), "seed": seed,
                            "steps": long_steps} for n in sorted(set(conf["long_sizes"]), reverse=True)]
    return points


def _energies(curves: Curves, ks: Sequence[int]) -> dict[str, list[float]]:
    return {str(k): curves.energy[k].double().tolist() for k in ks}


def _references(study: Study, conf: Mapping[str, Any]) -> list[ScoreSet]:
    """The score sets (val; OOD photo crops) with their cold curves and long cold / continuation energies."""
    model = WarpLCA(study.dictionary, torch.nn.Identity(), study.lca, study.norm).to(study.device)
    sets = [("val", study.images, np.arange(study.images.shape[0]), study.cold)]
    if int(conf["ood_images"]):
        crops = photo_crops(PHOTOS, 32, int(conf["ood_images"]))
        crops, _ = match_channels(crops, study.dictionary.in_channels)
        cold = run_curves(model, crops, sorted({*map(int, conf["ks"]), study.total}), warm=False,
                          batch_size=int(study.settings["batch_size"]), device=study.device,
                          show_progress=study.show_progress, desc="scaling: cold LCA on OOD photos")
        sets.append(("ood", crops, np.arange(crops.shape[0]) % len(PHOTOS), cold))
    out = []
    iters = int(conf["reference_iters"])
    for name, images, groups, cold in sets:
        x = study.lca_input(images)
        with torch.no_grad():
            cold_long = study.lca(x, iters=iters).energy.double().cpu().numpy()
            cont = solve_continuation(study.lca, x, iters, Continuation()).energy.double().cpu().numpy()
        out.append(ScoreSet(name, images, groups, cold, cold_long, cont))
    return out


def _state_error(model: WarpLCA, val: Any, limit: int = 256, batch_size: int = 64) -> float:
    """Mean over cached val targets of ‖û − u*‖ / ‖u*‖ (NaN without val targets)."""
    if val is None:
        return math.nan
    errs = []
    device = model.dictionary.weight.device
    with torch.no_grad():
        for start in range(0, min(limit, len(val)), batch_size):
            items = [val[i] for i in range(start, min(start + batch_size, limit, len(val)))]
            images = torch.stack([item[0] for item in items]).to(device)
            targets = torch.stack([item[1] for item in items])
            u = model.predict_states(model.preprocess(images)).cpu()
            norms = targets.flatten(1).norm(dim=1).clamp_min(1e-12)
            errs.append((u - targets).flatten(1).norm(dim=1) / norms)
    return float(torch.cat(errs).mean())


def _scorer(study: Study, sets: Sequence[ScoreSet], ks: Sequence[int], val_targets: Any) -> Any:
    def score(model: WarpLCA) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for s in sets:
            warm = run_curves(model, s.images, sorted({*ks, *study.budgets, study.total}), warm=True,
                              batch_size=int(study.settings["batch_size"]), device=study.device,
                              show_progress=False)
            if s.name == "val":
                row |= score_curves(warm, s.cold, study.budgets)
            row[f"{s.name}_energy"] = _energies(warm, [*ks, study.total])
            row[f"{s.name}_match"] = iterations_to_match(s.cold, warm, study.total)["per_image"]
            row[f"{s.name}_l0@T"] = float(warm.l0[study.total].double().mean())
        row["state_error"] = _state_error(model, val_targets)
        return row
    return score


# -- the law -------------------------------------------------------------------------------------------
def _e_ref(s: ScoreSet, rows: Sequence[Mapping[str, Any]], total: int) -> np.ndarray:
    ref = np.minimum(s.cold_long, s.continuation_long)
    for row in rows:
        ref = np.minimum(ref, np.asarray(row[f"{s.name}_energy"][str(total)], float))
    return ref


def _law(points: Sequence[Mapping[str, Any]], groups: np.ndarray, n_boot: int,
         holdout: float) -> dict[str, Any]:
    """Fit, bootstrap band and held-out prediction of one (set, predictor, k) series."""
    ns = [float(p["n"]) for p in points]
    ys = [float(np.mean(p["gap"])) for p in points]
    largest = max(ns)
    out: dict[str, Any] = {"n": ns, "y": ys}
    if len(set(ns)) < 3:
        return out
    law = fit_power_law(ns, ys)
    boots = bootstrap_fits(points, groups, n_boot)
    out["fit"] = asdict(law)
    out["floor_band"] = [float(np.percentile([b.floor for b in boots], q)) for q in (5, 95)]
    out["beta_band"] = [float(np.percentile([b.beta for b in boots], q)) for q in (5, 95)]
    train = [p for p in points if float(p["n"]) <= holdout * largest]
    if len({float(p["n"]) for p in train}) >= 3:
        held = fit_power_law([float(p["n"]) for p in train], [float(np.mean(p["gap"])) for p in train])
        held_boot = bootstrap_fits(train, groups, n_boot)
        preds = [float(b(largest)) for b in held_boot]
        measured = float(np.mean([y for n, y in zip(ns, ys, strict=True) if n == largest]))
        band = [float(np.percentile(preds, q)) for q in (5, 95)]
        out["holdout"] = {"fit": asdict(held), "predicted": float(held(largest)), "band": band,
                          "measured": measured, "within": band[0] <= measured <= band[1], "n": largest}
    return out


def analyse(rows: Sequence[Mapping[str, Any]], sets: Sequence[ScoreSet], conf: Mapping[str, Any],
            total: int) -> dict[str, Any]:
    """Gaps per point, the law per (set, predictor, k) on the fixed-steps points, Kaplan–Meier medians
    and the gap → iterations map; plain values (``scaling_fit.json``)."""
    steps = int(conf["steps"])
    result: dict[str, Any] = {"points": [], "laws": {}, "maps": {}}
    for s in sets:
        ref = _e_ref(s, rows, total)
        for row in rows:
            gaps = {k: relative_gap(np.asarray(row[f"{s.name}_energy"][str(k)], float), ref)
                    for k in map(int, conf["ks"])}
            times = [math.nan if v is None else float(v) for v in row[f"{s.name}_match"]]
            median = kaplan_meier(times, total)[2]
            result["points"].append({
                "set": s.name, "predictor": row["predictor"], "size": row["size"], "seed": row["seed"],
                "steps": row["steps"], "params": row["params"],
                **{f"gap@{k}": float(g.mean()) for k, g in gaps.items()},
                "km_median": median, "matched_frac": float(np.mean([not math.isnan(t) for t in times])),
                "state_error": row.get("state_error", math.nan), "_gaps": gaps})
        for name in conf["predictors"]:
            for k in map(int, conf["ks"]):
                series = [{"n": p["size"], "seed": p["seed"], "gap": p["_gaps"][k]} for p in result["points"]
                          if p["set"] == s.name and p["predictor"] == name and p["steps"] == steps]
                if series:
                    result["laws"][f"{s.name}/{name}/gap@{k}"] = _law(
                        series, s.groups, int(conf["bootstrap"]), float(conf["holdout"]))
        pts = [p for p in result["points"] if p["set"] == s.name]
        k0 = min(map(int, conf["ks"]))
        a, b = log_log_map([p[f"gap@{k0}"] for p in pts], [p["km_median"] for p in pts])
        result["maps"][s.name] = {"a": a, "b": b}
    for p in result["points"]:
        p.pop("_gaps")
    return result


def predictions(result: Mapping[str, Any], conf: Mapping[str, Any], targets: Sequence[int] = (250, 100)
                ) -> list[dict[str, Any]]:
    """What each full-range law predicts for ≤ ``targets`` iterations to match (through the gap →
    iterations map of its set), with how far outside the fitted sizes that lies."""
    k0 = min(map(int, conf["ks"]))
    rows = []
    for key, law in result["laws"].items():
        set_name, predictor, k = key.split("/")
        if k != f"gap@{k0}" or "fit" not in law:
            continue
        a, b = result["maps"][set_name]["a"], result["maps"][set_name]["b"]
        fitted = PowerLaw(**law["fit"])
        for iters in targets:
            z = (math.log(iters) - a) / b if b and math.isfinite(b) and b > 0 else math.nan
            gap = math.exp(min(z, 700.0)) if math.isfinite(z) else math.nan
            n = fitted.size_for(gap) if math.isfinite(gap) else math.nan
            rows.append({"set": set_name, "predictor": predictor, "iterations": iters, "gap": gap,
                         "targets": n, "extrapolation": n / max(law["n"]) if math.isfinite(n) else n,
                         "steps": int(conf["steps"])})
    return rows


# -- outputs -------------------------------------------------------------------------------------------
def plot_scaling(result: Mapping[str, Any], conf: Mapping[str, Any], path: Path) -> Path:
    """Gap against training-set size: one panel per (set, k), points per predictor, fit and band,
    the held-out prediction of the largest size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({p["set"] for p in result["points"]}, key=lambda s: s != "val")
    ks = [int(k) for k in conf["ks"]]
    fig, axes = plt.subplots(len(sets), len(ks), figsize=(4.2 * len(ks), 3.6 * len(sets)), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(conf["predictors"])}
    for i, s in enumerate(sets):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            for name in conf["predictors"]:
                pts = [p for p in result["points"] if p["set"] == s and p["predictor"] == name]
                fixed = [p for p in pts if p["steps"] == int(conf["steps"])]
                ax.plot([p["size"] for p in fixed], [p[f"gap@{k}"] for p in fixed], "o", color=colors[name],
                        alpha=0.7, label=name)
                long = [p for p in pts if p["steps"] != int(conf["steps"])]
                if long:
                    ax.plot([p["size"] for p in long], [p[f"gap@{k}"] for p in long], "s", mfc="none",
                            color=colors[name], label=f"{name}, {conf['long_factor']}× steps")
                law = result["laws"].get(f"{s}/{name}/gap@{k}", {})
                if "fit" in law:
                    grid = np.geomspace(min(law["n"]), 4 * max(law["n"]), 100)
                    ax.plot(grid, PowerLaw(**law["fit"])(grid), "-", color=colors[name], lw=1)
                if "holdout" in law:
                    h = law["holdout"]
                    ax.errorbar([h["n"]], [h["predicted"]], yerr=[[h["predicted"] - h["band"][0]],
                                [h["band"][1] - h["predicted"]]], fmt="x", color=colors[name], capsize=4)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{s}: gap after {k} WARP-LCA steps", fontsize=9)
            ax.set_xlabel("training targets n")
            ax.set_ylabel("(E_k − E_ref) / E_ref")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Scaling law at {conf['steps']} optimiser steps per point (fit L∞ + A·n^−β; ×: "
                 f"prediction of the largest size from sizes ≤ {conf['holdout']} of it, 90 % band)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: Mapping[str, Any], conf: Mapping[str, Any], total: int, n_val: int, n_ood: int) -> str:
    """The markdown section: method, law table, held-out test, predictions, the points."""
    laws = []
    for key, law in result["laws"].items():
        if "fit" not in law:
            continue
        s, predictor, k = key.split("/")
        h = law.get("holdout", {})
        laws.append({"set": s, "predictor": predictor, "quantity": k, "floor": law["fit"]["floor"],
                     "A": law["fit"]["scale"], "beta": law["fit"]["beta"],
                     "beta_band": " – ".join(fmt(v, 3) for v in law["beta_band"]),
                     "predicted": h.get("predicted", math.nan),
                     "band": " – ".join(fmt(v, 3) for v in h.get("band", [])) or "—",
                     "measured": h.get("measured", math.nan),
                     "within": {True: "yes", False: "**no**"}.get(h.get("within"), "—")})
    preds = predictions(result, conf)
    lines = [
        "## Scaling law of the warm start", "",
        f"Every point trains the run's predictor afresh for **{conf['steps']} optimiser steps** (cosine "
        f"over the steps) on n targets — nested, seeded samples stratified by photo × scale — so every point "
        f"costs the same whatever n; the {conf['long_factor']}× level trains {conf['long_predictor']} for "
        f"{int(conf['steps']) * int(conf['long_factor'])} steps. Quantity (fixed before fitting): per "
        f"image g_k = (E_k − E_ref)/E_ref after k WARP-LCA steps, E_ref the lowest energy known for the "
        f"image (cold and λ-continuation LCA for {conf['reference_iters']} steps, every point's WARP-LCA at "
        f"T = {total}). "
        f"Scored on {n_val} val crops (one photo: its band resamples crops) and {n_ood} crops of "
        f"{len(PHOTOS)} photos of other scenes (its band resamples photos). Fit y = L∞ + A·n^(−β); bands "
        f"are 5–95 % over {conf['bootstrap']} bootstrap replicates (photos or crops, and seeds).", "",
        markdown_table(laws, ("set", "predictor", "quantity", "floor", "A", "beta", "beta_band", "predicted",
                              "band", "measured", "within"),
                       ("set", "predictor", "g_k", "L∞", "A", "β", "β 90 % band",
                        f"held-out prediction at the largest n (fit on n ≤ {conf['holdout']}·max)",
                        "its 90 % band", "measured", "within band"), digits=4),
        "", "What the full-range laws predict for iterations-to-match (Kaplan–Meier median over images, "
        "through the measured log-log map gap@0 → median iterations of each set; `extrapolation` = "
        "predicted n / the largest n measured; inf: below the law's floor, unreachable by data alone at "
        "these steps):", "",
        markdown_table(preds, ("set", "predictor", "iterations", "gap", "targets", "extrapolation", "steps"),
                       ("set", "predictor", "≤ iterations to match", "gap@0 needed", "targets n needed",
                        "× the largest n", "steps per point"), digits=3),
        "", "The points:", "",
        markdown_table(result["points"], ("set", "predictor", "params", "size", "seed", "steps",
                                          *(f"gap@{k}" for k in conf["ks"]), "km_median", "matched_frac",
                                          "state_error"),
                       ("set", "predictor", "parameters", "n", "seed", "steps",
                        *(f"g_{k}" for k in conf["ks"]),
                        "median iterations to match (KM)", "matched", "state error ‖û−u*‖/‖u*‖"), digits=4),
        "", "![scaling law](scaling.png)", "", stamp(), "",
    ]
    return "\n".join(lines)


def run(ctx: RunContext) -> dict[str, float]:
    """Train and score every grid point (resumable), fit the law, write the section, plot and tables."""
    study = Study.for_stage(ctx, "scaling", selectors=GRID_SELECTORS)
    if study is None:
        return {}
    conf = study.conf
    n = len(study.train)
    val_targets = target_sets(ctx, study.dictionary, study.lca, study.norm, splits=("val",)).get("val")
    sets = _references(study, conf)
    score = _scorer(study, sets, [int(k) for k in conf["ks"]], val_targets)
    orders: dict[int, torch.Tensor] = {}
    grid = point_grid(conf, n)
    for i, point in enumerate(grid):
        seed = int(point["seed"])
        order = orders.setdefault(seed, nested_order(study.train.images, n, seed))
        subset = order[: point["size"]].tolist()
        key = {"variant": f"{point['predictor']}, n={point['size']}, seed {seed}, {point['steps']} steps",
               **point}
        log.info("scaling: point %d/%d: %s", i + 1, len(grid), key["variant"])
        study.variant(key, 1, predictor_overrides=conf["predictors"][point["predictor"]],
                      train=lambda subset=subset: Subset(study.train, subset), steps=int(point["steps"]),
                      seed=seed, score=score)
    rows = [r for r in study.rows if any(all(r.get(k) == v for k, v in p.items()) for p in grid)]
    result = analyse(rows, sets, conf, study.total)
    md = report(result, conf, study.total, sets[0].images.shape[0],
                sets[1].images.shape[0] if len(sets) > 1 else 0)
    plot_scaling(result, conf, ctx.artifact("scaling.png"))
    write_text_atomic(ctx.artifact("scaling.md"), md)
    write_text_atomic(ctx.artifact("scaling_fit.json"), json.dumps(result, indent=1, default=float))
    write_csv(ctx.artifact(ARTIFACT), result["points"])  # scaling.partial.json stays: the points' cache
    print("\n" + md, flush=True)
    metrics: dict[str, float] = {}
    for key, law in result["laws"].items():
        if "holdout" in law:
            metrics[f"{key}/holdout_within"] = float(law["holdout"]["within"])
        if "fit" in law:
            metrics[f"{key}/beta"] = law["fit"]["beta"]
            metrics[f"{key}/floor"] = law["fit"]["floor"]
    return metrics
