"""The warm start's scaling law: a floor plus a power law in the training-set size, its bootstrap band,
its held-out prediction, and iterations-to-match as a censored quantity (Kaplan–Meier).

The fitted quantity is chosen before any fit: per image the relative energy gap
g_k = (E_k − E_ref) / E_ref after k WARP-LCA steps, E_ref the lowest energy known for that image (long
cold, long continuation and every variant's warm run at T); a point's value is the mean over images.
Pure numpy: nothing here trains or runs LCA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PowerLaw", "bootstrap_fits", "fit_power_law", "kaplan_meier", "log_log_map", "relative_gap"]


def relative_gap(energy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image (E − E_ref) / E_ref (E_ref > 0); ``energy`` (..., N), ``reference`` (N,)."""
    reference = np.asarray(reference, float)
    if np.any(reference <= 0):
        raise ValueError("reference energies must be positive")
    return (np.asarray(energy, float) - reference) / reference


@dataclass(frozen=True)
class PowerLaw:
    """y(n) = floor + scale · n^(−beta)."""

    floor: float
    scale: float
    beta: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        return self.floor + self.scale * np.power(np.asarray(n, float), -self.beta)

    def size_for(self, y: float) -> float:
        """The n where the law reaches ``y`` (inf at or below the floor)."""
        if y <= self.floor or self.scale <= 0:
            return math.inf
        return float((self.scale / (y - self.floor)) ** (1.0 / self.beta))


def fit_power_law(n: Sequence[float], y: Sequence[float], betas: np.ndarray | None = None) -> PowerLaw:
    """Least squares of y = L∞ + A·n^(−β) with L∞ ≥ 0, A ≥ 0: for every β of a grid the linear problem in
    (L∞, A) is solved exactly (constraints by clipping and refitting the other coefficient)."""
    n_arr, y_arr = np.asarray(n, float), np.asarray(y, float)
    if n_arr.size < 3 or np.unique(n_arr).size < 2:
        raise ValueError(f"a floor + power law needs ≥ 3 points at ≥ 2 sizes, got {n_arr.size}")
    betas = np.linspace(0.02, 2.0, 199) if betas is None else betas
    best: tuple[float, PowerLaw] | None = None
    for beta in betas:
        z = np.power(n_arr, -beta)
        design = np.stack([np.ones_like(z), z], 1)
        (floor, scale), *_ = np.linalg.lstsq(design, y_arr, rcond=None)
        if floor < 0:
            floor, scale = 0.0, float(max(z @ y_arr / (z @ z), 0.0))
        if scale < 0:
            floor, scale = float(y_arr.mean()), 0.0
        sse = float(np.sum((floor + scale * z - y_arr) ** 2))
        if best is None or sse < best[0]:
            best = (sse, PowerLaw(float(floor), float(scale), float(beta)))
    assert best is not None
    return best[1]


def bootstrap_fits(points: Sequence[Mapping[str, object]], groups: np.ndarray, n_boot: int = 200,
                   seed: int = 0) -> list[PowerLaw]:
    """Fits of resampled data: each point holds ``n`` (size), ``seed`` and ``gap`` (per-image values,
    aligned with ``groups``, the photo of each image); a replicate resamples photos (with replacement,
    images within them kept) and, per size, the seeds measured there."""
    rng = np.random.default_rng(seed)
    photos = np.unique(groups)
    by_size: dict[float, list[Mapping[str, object]]] = {}
    for p in points:
        by_size.setdefault(float(p["n"]), []).append(p)  # type: ignore[arg-type]
    fits = []
    for _ in range(n_boot):
        chosen = rng.choice(photos, size=photos.size, replace=True)
        idx = np.concatenate([np.flatnonzero(groups == ph) for ph in chosen])
        ns, ys = [], []
        for size, pts in by_size.items():
            for j in rng.integers(0, len(pts), size=len(pts)):
                ns.append(size)
                ys.append(float(np.mean(np.asarray(pts[j]["gap"], float)[idx])))
        fits.append(fit_power_law(ns, ys))
    return fits


def kaplan_meier(times: Sequence[float], limit: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The Kaplan–Meier curve of times-to-match (NaN or > ``limit``: censored at ``limit``): event times,
    the fraction not yet matched after each, and the median (inf when fewer than half match)."""
    t = np.asarray(times, float)
    observed = np.isfinite(t) & (t <= limit)
    t = np.where(observed, t, limit)
    event_times = np.unique(t[observed])
    surv, s = [], 1.0
    for et in event_times:
        at_risk = np.sum(t >= et)
        s *= 1.0 - np.sum((t == et) & observed) / at_risk
        surv.append(s)
    surv_arr = np.asarray(surv)
    below = np.flatnonzero(surv_arr <= 0.5)
    median = float(event_times[below[0]]) if below.size else math.inf
    return event_times, surv_arr, median


def log_log_map(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, b) of log y = a + b·log x over the finite positive pairs: the measured gap → iterations map."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    if ok.sum() < 2:
        return math.nan, math.nan
    b, a = np.polyfit(np.log(xa[ok]), np.log(ya[ok]), 1)
    return float(a), float(b)
