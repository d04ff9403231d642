"""Thresholds T_λ against the brute-force proximal maps of their penalties.

The penalties are written here from the design table (not taken from the code under test), and
the proximal map argmin_a ½(a − u)² + P(a) is found by exhaustive search on a dense grid of a.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from warplca.lca import THRESHOLDS, get_threshold

LAM = 1.0
A_STEP = 5e-4
A_GRID = np.round(np.arange(-3.5, 3.5 + A_STEP / 2, A_STEP), 10)  # contains 0 exactly
U_GRID = np.linspace(-3.0, 3.0, 1201)


def half_mu(lam: float) -> float:
    """Documented λ ↔ μ mapping of ``half``: the jump (54^{1/3}/4)·(2μ)^{2/3} sits at |u| = λ."""
    return 0.5 * (4.0 * lam / 54.0 ** (1.0 / 3.0)) ** 1.5


def ref_penalty(name: str, a: np.ndarray, lam: float, theta: float, nonneg: bool) -> np.ndarray:
    """P_λ(a) from the README table ("The maths"), plus the indicator of a ≥ 0 for the non-negative
    variants."""
    mag = np.abs(a)
    if name == "hard":
        p = np.where(a != 0, lam * lam / 2, 0.0)
    elif name == "soft":
        p = lam * mag
    elif name == "cel0":  # firm / minimax-concave penalty, flat above λ
        p = np.where(mag <= lam, theta * lam * mag - theta * mag**2 / 2, theta * lam * lam / 2)
    elif name == "half":
        p = half_mu(lam) * np.sqrt(mag)
    else:
        raise AssertionError(name)
    if nonneg:
        p = np.where(a < 0, np.inf, p)
    return p


def brute_prox(name: str, u: np.ndarray, lam: float, theta: float,
               nonneg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Grid argmin and grid minimum of ½(a − u)² + P(a) for every u."""
    pen = ref_penalty(name, A_GRID, lam, theta, nonneg)
    obj = 0.5 * (A_GRID[None, :] - u[:, None]) ** 2 + pen[None, :]
    idx = obj.argmin(axis=1)
    return A_GRID[idx], obj[np.arange(len(u)), idx]


def jump_points(name: str, lam: float, nonneg: bool) -> list[float]:
    """Values of u where the proximal map is discontinuous (a tie between two minimisers)."""
    if name in ("hard", "half"):
        return [lam] if nonneg else [-lam, lam]
    return []


CASES = [("hard", 0.5), ("soft", 0.5), ("cel0", 0.25), ("cel0", 0.75), ("half", 0.5)]


@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize(("name", "theta"), CASES, ids=[f"{n}-{t}" for n, t in CASES])
@pytest.mark.parametrize("lam", [LAM, 0.6])
def test_threshold_is_brute_force_prox(name: str, theta: float, nonneg: bool, lam: float) -> None:
    thr = get_threshold(name, lam=lam, nonneg=nonneg, theta=theta)
    ours = thr(torch.from_numpy(U_GRID)).numpy()
    grid_a, grid_min = brute_prox(name, U_GRID, lam, theta, nonneg)
    # 1. The objective at our value is the global minimum (everywhere, ties included): the grid
    #    minimum can only be ≥ the true one.
    our_obj = 0.5 * (ours - U_GRID) ** 2 + ref_penalty(name, ours, lam, theta, nonneg)
    assert np.all(our_obj <= grid_min + 1e-9), np.max(our_obj - grid_min)
    # 2. The minimiser itself, away from the tie points (there either side is a minimiser).
    far = np.ones_like(U_GRID, dtype=bool)
    for j in jump_points(name, lam, nonneg):
        far &= np.abs(U_GRID - j) > 3 * A_STEP + 1e-3
    np.testing.assert_allclose(ours[far], grid_a[far], atol=1.5 * A_STEP, rtol=0)
    # 3. Exact zeros inside the dead zone (LCA's sparsity depends on it); the zone is eroded by
    #    two u-grid steps so that no point sits on its edge.
    zero = grid_a == 0.0
    zero = far & zero & np.roll(zero, 2) & np.roll(zero, -2)
    assert zero.sum() > 50
    assert np.all(ours[zero] == 0.0)


@pytest.mark.parametrize(("name", "theta"), CASES)
@pytest.mark.parametrize("nonneg", [False, True])
def test_penalty_matches_design_table(name: str, theta: float, nonneg: bool) -> None:
    thr = get_threshold(name, lam=0.8, nonneg=nonneg, theta=theta)
    a = np.linspace(-2.5, 2.5, 1001)
    ours = thr.penalty(torch.from_numpy(a)).numpy()
    ref = ref_penalty(name, a, 0.8, theta, nonneg)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    # penalty_sum is the per-sample sum (the batch dimension kept).
    a2 = torch.from_numpy(np.abs(a[:1000]).reshape(4, 10, 5, 5))
    np.testing.assert_allclose(thr.penalty_sum(a2).numpy(), thr.penalty(a2).flatten(1).sum(1).numpy(),
                               rtol=1e-12)


def test_penalty_known_values() -> None:
    lam = 1.5
    a = torch.tensor([0.0, 0.3, -2.0, 7.0], dtype=torch.float64)
    hard = get_threshold("hard", lam).penalty(a)
    assert hard.tolist() == [0.0, lam**2 / 2, lam**2 / 2, lam**2 / 2]
    soft = get_threshold("soft", lam).penalty(a)
    assert soft.tolist() == pytest.approx([0.0, 0.45, 3.0, 10.5])
    theta = 0.5
    cel0 = get_threshold("cel0", lam, theta=theta).penalty(a)
    # Below λ: θλ|a| − θa²/2; at and above λ the constant θλ²/2 (continuous at |a| = λ).
    assert cel0.tolist() == pytest.approx([0.0, 0.5 * 1.5 * 0.3 - 0.25 * 0.09, 0.5625, 0.5625])
    half = get_threshold("half", lam).penalty(a)
    assert half.tolist() == pytest.approx([0.0, *(half_mu(lam) * math.sqrt(v) for v in (0.3, 2.0, 7.0))])
    nn = get_threshold("soft", lam, nonneg=True).penalty(a)
    assert math.isinf(nn[2]) and nn[1] == pytest.approx(0.45)


def test_half_mapping_and_jump() -> None:
    lam = 0.7
    thr = get_threshold("half", lam)
    assert thr.mu == pytest.approx(half_mu(lam), rel=1e-12)
    # Xu et al.: the half threshold for min (a − u)² + λ_xu|a|^{1/2} jumps at (54^{1/3}/4)·λ_xu^{2/3};
    # here λ_xu = 2μ and the jump must be at |u| = λ.
    assert (54 ** (1 / 3) / 4) * (2 * thr.mu) ** (2 / 3) == pytest.approx(lam, rel=1e-12)
    u = torch.tensor([lam - 1e-6, lam + 1e-6, -lam - 1e-6, -lam + 1e-6], dtype=torch.float64)
    a = thr(u)
    assert a[0] == 0 and a[3] == 0
    # The jump value: (2/3)|u| (the half threshold's size at the jump point).
    assert a[1].item() == pytest.approx(2 * lam / 3, rel=1e-3)
    assert a[2].item() == pytest.approx(-2 * lam / 3, rel=1e-3)
    # The brute force agrees on the jump location.
    uu = np.array([lam - 0.01, lam + 0.01])
    grid_a, _ = brute_prox("half", uu, lam, 0.5, False)
    assert grid_a[0] == 0 and grid_a[1] > 0.4


@pytest.mark.parametrize("name", THRESHOLDS)
def test_threshold_lam_zero_and_dtype(name: str) -> None:
    u = torch.randn(2, 3, 4, 4, dtype=torch.float32)
    if name in ("hard", "soft"):
        torch.testing.assert_close(get_threshold(name, 0.0)(u), u)
    out = get_threshold(name, 0.5)(u)
    assert out.dtype == u.dtype and out.shape == u.shape


def test_threshold_validation() -> None:
    with pytest.raises(ValueError, match="threshold must be one of"):
        get_threshold("ista", 1.0)
    with pytest.raises(ValueError, match="lam"):
        get_threshold("hard", -0.1)
    with pytest.raises(ValueError, match="lam"):
        get_threshold("soft", float("nan"))
    for theta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"theta .* \(0, 1\)"):
            get_threshold("cel0", 1.0, theta=theta)
