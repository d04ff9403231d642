"""Cold LCA vs WARP-LCA against the iteration count: the measurement every experiment is built on.

For each condition (cold: u₀ = 0; warm: u₀ = WARP-CNN(x)) the solver runs **once** per batch up to
the budget T, in segments between checkpoints k ∈ {0, 1, 2, 3, 5, 10, …, T}: each segment restarts LCA
from the previous segment's states for Δk more steps, which is step-for-step the same computation as
one long run (the Euler update only depends on u). Energy, ℓ0 and MSE come from the solver's trace at
*every* iteration; PSNR and SSIM (on [0, 1] pixels after ``postprocess``, clamped, ``data_range=1.0``)
at the checkpoints, where the reconstruction is at hand.

From the traces: :func:`iterations_to_match` (the first k at which WARP-LCA's energy is ≤ cold LCA's at
T) and :func:`equal_energy_speedup` (the same question for every budget, both ways). WARP-LCA starts
through ``model.warm_start(x)`` where the model has it (:class:`warplca.bundle.WarpLCA`), so the curves
are those of ``model(x, warm=True)``, start guard included. Nothing here writes files.
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
    "CURVE_METRICS", "SPEEDUP_COLUMNS", "Curves", "curve_rows", "equal_energy_speedup", "iterations_to_match",
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

    def checkpoint_means(self, metric: str) -> tuple[list[int], np.ndarray]:
        """The checkpoints k ≥ 1 and the mean ``psnr`` or ``ssim`` there (what log-x plots draw)."""
        ks = [k for k in self.ks if k >= 1]
        return ks, getattr(self, metric)[[self.ks.index(k) for k in ks]].mean(1).numpy()

    @property
    def guard_frac(self) -> float:
        """Fraction of images the start guard sent back to the cold start (NaN: no guard)."""
        return math.nan if self.guarded is None else float(self.guarded.double().mean())


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
def run_curves(model: EvalModel, images: Tensor, ks: Sequence[int], warm: bool, *,
               target: Tensor | None = None, batch_size: int = 64, keep: int = 0,
               keep_ks: Sequence[int] = (), device: torch.device | None = None, show_progress: bool = True,
               desc: str | None = None) -> Curves:
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
    traces: dict[str, list[Tensor]] = {"energy": [], "l0": [], "mse": []}
    psnr, ssim, guarded = [], [], []
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
            segs: dict[str, list[Tensor]] = {key: [] for key in traces}
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
                p, s = pixel_quality(pixels, target[sl])
                q_psnr.append(p)
                q_ssim.append(s)
                if k in kept and sl.start < keep:
                    m = min(keep, sl.stop) - sl.start
                    kept[k].append(pixels[:m].cpu())
                    kept_codes[k].append(res.a[:m].detach().cpu())
                bar.update((k - prev) * img.shape[0])
                u = res.u
                prev = k
            for key in traces:
                traces[key].append(torch.cat(segs[key]))
            psnr.append(torch.stack(q_psnr))
            ssim.append(torch.stack(q_ssim))
    finally:
        bar.close()
    return Curves(
        method=method,
        ks=ks,
        **{key: torch.cat(v, 1) for key, v in traces.items()},
        psnr=torch.cat(psnr, 1).to(torch.float64),
        ssim=torch.cat(ssim, 1).to(torch.float64),
        numel=int(img[0].numel()),
        code_numel=int(res.a[0].numel()),
        kept={k: torch.cat(v) for k, v in kept.items() if v},
        kept_codes={k: torch.cat(v) for k, v in kept_codes.items() if v},
        guarded=torch.cat(guarded) if guarded and len(guarded) == len(psnr) else None,
    )


def measure(model: EvalModel, images: Tensor, total: int, budgets: Sequence[int] = (), *,
            ks: Sequence[int] | None = None, name: str = "", **kwargs: Any
            ) -> tuple[dict[str, Curves], dict[str, Any]]:
    """Cold and warm :class:`Curves` on the checkpoints ``ks`` (default: the log grid) plus ``budgets``
    (and ``keep_ks``) up to ``total``, and their :func:`iterations_to_match`. ``kwargs`` go to
    :func:`run_curves`; ``name`` labels the progress bars."""
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

    Returns ``reference`` (T), ``iterations_to_match`` (k on the mean curves, NaN if never),
    ``per_image`` (N floats, NaN if never), ``iterations_to_match_median`` (over images; NaN counts as
    "never", so the median is NaN when fewer than half match), ``matched_frac`` and
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
    return {
        "reference": total,
        "iterations_to_match": k_mean,
        "per_image": per_image,
        "iterations_to_match_median": ordered[(len(ordered) - 1) // 2] if ordered else math.nan,
        "matched_frac": float(hit.to(torch.float64).mean()),
        "speedup": total / max(k_mean, 1.0) if not math.isnan(k_mean) else math.nan,
    }


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
    """Equal-energy iterations of cold LCA and WARP-LCA from their per-iteration energy traces.

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
    above T/k) or ``0.0`` (cold budget: below k/T). A warm-budget count of 0 (speed-up 0) means
    WARP-LCA after k iterations is no lower than the cold start itself (e.g. both still on the hard
    threshold's plateau at ½‖x‖²).
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
            qs = [_nearest_rank(image_iters[j], q) for q in SPEEDUP_QUANTILES]
            if budget == "warm":
                ratio = (lambda c, k=k: c / k if k else math.nan)
                pair = {"warm_iterations": k, "cold_iterations": it}
                q_speed = [ratio(v) for v in qs]
            else:
                ratio = (lambda w, k=k: k / max(w, 1.0))
                pair = {"warm_iterations": it, "cold_iterations": k}
                q_speed = [ratio(v) for v in reversed(qs)]  # more iterations: smaller speed-up
            names = [f"q{round(100 * q)}" for q in SPEEDUP_QUANTILES]
            rows.append({
                "budget": budget,
                "k": k,
                "energy": float(given[k].mean()),
                **pair,
                "speedup": ratio(it),
                **{f"{n}_iterations": v for n, v in zip(names, qs, strict=True)},
                **{f"{n}_speedup": v for n, v in zip(names, q_speed, strict=True)},
                "never_frac": float(torch.isinf(image_iters[j]).double().mean()),
                "T": total,
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
