"""Cold LCA vs WARP-LCA against the iteration count: the measurement every experiment is built on.

Each condition (cold: u₀ = 0; warm: ``model.warm_start(x)``) runs **once** per batch up to T, in
segments between checkpoints that restart LCA from the previous states (step-for-step one long run: the
Euler update depends only on u). Energy, ℓ0 and MSE come from every iteration, PSNR/SSIM from the
checkpoints. Nothing here writes files.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    batch_slices,
    clip_ks,
    log_spaced_ks,
    normalize_ks,
    pixel_quality,
    progress,
    to_pixels,
)

__all__ = [
    "CURVE_METRICS", "SPEEDUP_COLUMNS", "Curves", "curve_rows", "equal_energy_speedup", "full_run_solver",
    "iterations_to_match",
    "measure", "row_metrics", "run_curves", "warm_start",
]

#: per-k metrics in the CSV tables, in column order
CURVE_METRICS = ("energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac", "mse")
#: per-image quantiles of the equal-energy speed-up (nearest rank, as the iterations-to-match median)
SPEEDUP_QUANTILES = (0.25, 0.5, 0.75)
SPEEDUP_COLUMNS = (
    "budget", "k", "energy", "warm_iterations", "cold_iterations", "speedup",
    "q25_iterations", "q50_iterations", "q75_iterations", "q25_speedup", "q50_speedup", "q75_speedup",
    "never_frac", "T",
)


@dataclass
class Curves:
    """Per-image measurements of one condition (``cold`` or ``warm``).

    ``energy``, ``l0``, ``mse``: trace (T + 1, N), row k after k steps; ``psnr``, ``ssim``: (len(ks), N) at
    the checkpoints ``ks`` (ks[-1] = T); ``numel``: C·H·W; ``code_numel``: K·H'·W'; ``kept`` /
    ``kept_codes``: k -> [0, 1] reconstructions / codes of the first images; ``guarded``: (N,) bool,
    images the start guard sent back to the cold start (None: no guard).
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
        """N, the number of images."""
        return self.energy.shape[1]

    def at(self, k: int) -> dict[str, float]:
        """Means over images of every metric after k steps (k must be a checkpoint for PSNR/SSIM)."""
        if k not in self.ks:
            raise KeyError(f"k={k} is not one of the measured checkpoints {self.ks}")
        j, e = self.ks.index(k), self.energy[k]
        return {"energy": float(e.mean()), "energy_norm": float((e / self.numel).mean()),
                "psnr": float(self.psnr[j].mean()), "ssim": float(self.ssim[j].mean()),
                "l0": float(self.l0[k].mean()), "l0_frac": float((self.l0[k] / self.code_numel).mean()),
                "mse": float(self.mse[k].mean())}

    def checkpoint_means(self, metric: str) -> tuple[list[int], np.ndarray]:
        """The checkpoints k ≥ 1 and the mean ``psnr`` or ``ssim`` there (what log-x plots draw)."""
        ks = [k for k in self.ks if k >= 1]
        return ks, getattr(self, metric)[[self.ks.index(k) for k in ks]].mean(1).numpy()

    @property
    def guard_frac(self) -> float:
        """Fraction of images the start guard sent back to the cold start (NaN: no guard)."""
        return math.nan if self.guarded is None else float(self.guarded.double().mean())


def warm_start(model: EvalModel, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """WARP-LCA's u₀ for ``x`` (coded space) and which images the start guard sent back (None: no guard):
    ``model.warm_start(x)`` where the model has it (the start ``model(x)`` takes), else the prediction."""
    start = getattr(model, "warm_start", None)
    if callable(start):
        ws = start(x)
        return ws.states, ws.guarded
    return model.predict_states(x), None


def full_run_solver(model: EvalModel) -> Any:
    """``model.lca`` without early stopping (a copy when it has a tolerance): every run takes its budget."""
    solver = model.lca
    if getattr(solver, "tol", None) is not None:
        solver = copy.copy(solver)
        solver.tol = None
    return solver


@torch.no_grad()
def run_curves(model: EvalModel, images: Tensor, ks: Sequence[int], warm: bool, *,
               target: Tensor | None = None, batch_size: int = 64, keep: int = 0,
               keep_ks: Sequence[int] = (), device: torch.device | None = None, show_progress: bool = True,
               desc: str | None = None) -> Curves:
    """Run one condition on ``images`` ([0, 1], (N, C, H, W)) and measure it at the checkpoints ``ks``
    (0 and T = max(ks) added). ``warm``: start from :func:`warm_start`; ``target``: clean images for
    PSNR/SSIM (default ``images``); reconstructions and codes of the first ``keep`` images kept at
    ``keep_ks``."""
    ks = normalize_ks(ks, max(ks))
    total = ks[-1]
    target = images if target is None else target
    if target.shape != images.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from images {tuple(images.shape)}")
    device = device or model.dictionary.weight.device
    solver = full_run_solver(model)  # a tolerance would break the segment identity
    n = images.shape[0]
    traces: dict[str, list[Tensor]] = {"energy": [], "l0": [], "mse": []}
    quality: dict[str, list[Tensor]] = {"psnr": [], "ssim": []}
    guarded: list[Tensor] = []
    kept: dict[int, list[Tensor]] = {k: [] for k in keep_ks}
    kept_codes: dict[int, list[Tensor]] = {k: [] for k in keep_ks}
    method = "warm" if warm else "cold"
    bar = progress(total * n, desc or f"{METHODS[method]}: {total} iterations", show_progress)
    try:
        for sl in batch_slices(n, batch_size):
            img = images[sl].to(device)
            x = model.preprocess(img)
            u = None
            if warm:
                u, fired = warm_start(model, x)
                if fired is not None:
                    guarded.append(fired.detach().to("cpu", torch.bool))
            segs: dict[str, list[Tensor]] = {key: [] for key in (*traces, *quality)}
            prev = 0
            for k in ks:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the τ < L warning repeats on every segment
                    res = solver(x, iters=k - prev, u0=u, trace=True)
                first = 0 if k == 0 else 1  # row 0 of a segment repeats the previous segment's last row
                for key in traces:
                    segs[key].append(res.trace[key][first:].detach().to("cpu", torch.float64))
                pixels = to_pixels(model, res.recon, img)
                for key, value in zip(quality, pixel_quality(pixels, target[sl]), strict=True):
                    segs[key].append(value)
                if k in kept and sl.start < keep:
                    m = min(keep, sl.stop) - sl.start
                    kept[k].append(pixels[:m].cpu())
                    kept_codes[k].append(res.a[:m].detach().cpu())
                bar.update((k - prev) * img.shape[0])
                u = res.u
                prev = k
            for key in traces:
                traces[key].append(torch.cat(segs[key]))
            for key in quality:
                quality[key].append(torch.stack(segs[key]))
    finally:
        bar.close()
    return Curves(
        method=method, ks=ks, **{key: torch.cat(v, 1) for key, v in traces.items()},
        **{key: torch.cat(v, 1).to(torch.float64) for key, v in quality.items()},
        numel=int(img[0].numel()), code_numel=int(res.a[0].numel()),
        kept={k: torch.cat(v) for k, v in kept.items() if v},
        kept_codes={k: torch.cat(v) for k, v in kept_codes.items() if v},
        guarded=torch.cat(guarded) if guarded and len(guarded) == len(quality["psnr"]) else None,
    )


def measure(model: EvalModel, images: Tensor, total: int, budgets: Sequence[int] = (), *,
            ks: Sequence[int] | None = None, name: str = "",
            **kwargs: Any) -> tuple[dict[str, Curves], dict[str, Any]]:
    """Cold and warm :class:`Curves` on ``ks`` (default: the log grid), ``budgets`` and ``keep_ks`` up to
    ``total``, and their :func:`iterations_to_match`; ``kwargs`` go to :func:`run_curves`."""
    base = log_spaced_ks(total) if ks is None else ks
    grid = clip_ks([*base, *budgets, *kwargs.get("keep_ks", ())], total)
    curves = {
        method: run_curves(model, images, grid, warm=(method == "warm"),
                           desc=f"{name + ': ' if name else ''}{label} ×{total}", **kwargs)
        for method, label in METHODS.items()
    }
    return curves, iterations_to_match(curves["cold"], curves["warm"], total)


def iterations_to_match(cold: Curves, warm: Curves, total: int | None = None) -> dict[str, Any]:
    """First k with warm energy ≤ cold energy at T, on the mean curve and per image.

    Returns ``reference`` (T), ``iterations_to_match`` (mean curves; NaN: never), ``per_image`` (N floats),
    ``iterations_to_match_median`` (NaN sorts last: NaN when fewer than half match), ``matched_frac`` and
    ``speedup`` = T / iterations_to_match.
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
    return {"reference": total, "iterations_to_match": k_mean, "per_image": per_image,
            "iterations_to_match_median": ordered[(len(ordered) - 1) // 2] if ordered else math.nan,
            "matched_frac": float(hit.to(torch.float64).mean()),
            "speedup": total / max(k_mean, 1.0) if not math.isnan(k_mean) else math.nan}


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
    """Equal-energy iterations of cold LCA and WARP-LCA from their energy traces, for every k of ``ks``
    (default: the warm checkpoints).

    ``budget="warm"`` rows: mean WARP-LCA energy after k and ``cold_iterations``, the first iteration where
    cold's mean energy is ≤ it; ``speedup`` = cold_iterations / k (NaN at k = 0). ``budget="cold"`` rows
    (k ≥ 1): the converse, ``speedup`` = k / max(warm_iterations, 1) (at k = T: iterations-to-match).
    Per image: nearest-rank quartiles ``q25/q50/q75_iterations`` / ``_speedup`` and ``never_frac``.
    Never within T is ``inf`` iterations, speed-up ``inf`` (warm budget) or ``0.0`` (cold budget); a
    warm count of 0 means WARP-LCA after k is no lower than the cold start (e.g. the hard plateau).
    """
    total = min(cold.total, warm.total)
    grid = sorted({int(k) for k in (warm.ks if ks is None else ks) if 0 <= int(k) <= total})
    ce, we = cold.energy[: total + 1].double(), warm.energy[: total + 1].double()
    names = [f"q{round(100 * q)}" for q in SPEEDUP_QUANTILES]
    rows: list[dict[str, Any]] = []
    for budget, counted, given, other in (("warm", "cold", we, ce), ("cold", "warm", ce, we)):
        kk = [k for k in grid if budget == "warm" or k >= 1]
        if not kk:
            continue
        idx = torch.tensor(kk)
        mean_iters = _first_reach(other.mean(1), given.mean(1)[idx])  # (K,)
        image_iters = _first_reach(other, given[idx])  # (K, N)
        for j, k in enumerate(kk):
            it = float(mean_iters[j])
            qs = [_nearest_rank(image_iters[j], q) for q in SPEEDUP_QUANTILES]
            if budget == "warm":
                ratio = (lambda c, k=k: c / k if k else math.nan)
            else:  # more iterations, smaller speed-up: the quartiles swap
                ratio = (lambda w, k=k: k / max(w, 1.0))
            q_speed = [ratio(v) for v in (qs if budget == "warm" else reversed(qs))]
            rows.append({
                "budget": budget, "k": k, "energy": float(given[k].mean()),
                **{f"{budget}_iterations": k, f"{counted}_iterations": it}, "speedup": ratio(it),
                **{f"{n}_iterations": v for n, v in zip(names, qs, strict=True)},
                **{f"{n}_speedup": v for n, v in zip(names, q_speed, strict=True)},
                "never_frac": float(torch.isinf(image_iters[j]).double().mean()), "T": total,
            })
    return rows


def curve_rows(curves: Mapping[str, Curves], extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (method, checkpoint k): ``extra``, then the means of every metric at k."""
    return [{**(extra or {}), "method": method, "k": k, **c.at(k)}
            for method, c in curves.items() for k in c.ks]


def row_metrics(prefix: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                group: str | None = None) -> dict[str, Any]:
    """``<prefix>[/<row[group]>]/<method>/<key>@<k>`` -> value, for every :func:`curve_rows` row and key."""
    return {f"{prefix}{'/' + str(r[group]) if group else ''}/{r['method']}/{key}@{r['k']}": r[key]
            for r in rows for key in keys}
