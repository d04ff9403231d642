"""LCA against a dense-matrix numpy reference, plus optimality, descent, fixed points and errors.

The reference builds the synthesis matrix A by explicit loops (the geometry of README, "The maths") and runs
u ← u + η(Aᵀ(x − A·T(u)) + T(u) − u) in numpy with thresholds and penalties written here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from warplca.lca import LCA, ConvDictionary


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny problems: one thread (torch and BLAS) avoids stalls of thread pools on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def top_eigenvalue(mat: np.ndarray) -> float:
    """‖A‖²_op = largest eigenvalue of AᵀA (or AAᵀ, the smaller one)."""
    gram = mat.T @ mat if mat.shape[1] <= mat.shape[0] else mat @ mat.T
    return float(np.linalg.eigvalsh(gram)[-1])


# -- the reference ---------------------------------------------------------------------------------
def synthesis_matrix(weight: np.ndarray, stride: int, height: int, width: int, circular: bool) -> np.ndarray:
    """Dense A (C·H·W × K·H'·W'): atom m at code (i, j) puts Φ[m, c, dy, dx] on pixel
    (c, s·i + dy − p, s·j + dx − p), dropped outside the image (zeros) or wrapped (circular)."""
    n_atoms, channels, k, _ = weight.shape
    p = (k - 1) // 2
    hc, wc = -(-height // stride), -(-width // stride)
    mat = np.zeros((channels * height * width, n_atoms * hc * wc))
    for m in range(n_atoms):
        for i in range(hc):
            for j in range(wc):
                col = (m * hc + i) * wc + j
                for c in range(channels):
                    for dy in range(k):
                        for dx in range(k):
                            y, x = stride * i + dy - p, stride * j + dx - p
                            if circular:
                                y, x = y % height, x % width
                            elif not (0 <= y < height and 0 <= x < width):
                                continue
                            mat[(c * height + y) * width + x, col] += weight[m, c, dy, dx]
    return mat


def ref_threshold(name: str, lam: float, nonneg: bool = False, theta: float = 0.5) -> Callable:
    """T_λ from the README table ("The maths"), in numpy."""

    def fn(u: np.ndarray) -> np.ndarray:
        if nonneg:
            u = np.maximum(u, 0.0)
        mag = np.abs(u)
        if name == "hard":
            return np.where(mag > lam, u, 0.0)
        if name == "soft":
            return np.sign(u) * np.maximum(mag - lam, 0.0)
        if name == "cel0":
            firm = np.sign(u) * (mag - theta * lam) / (1 - theta)
            return np.where(mag > lam, u, np.where(mag > theta * lam, firm, 0.0))
        raise AssertionError(name)

    return fn


def ref_penalty(name: str, lam: float, theta: float = 0.5) -> Callable:
    def fn(a: np.ndarray) -> float:
        mag = np.abs(a)
        if name == "hard":
            return float(np.count_nonzero(a) * lam * lam / 2)
        if name == "soft":
            return float(lam * mag.sum())
        if name == "cel0":
            inner = theta * lam * mag - theta * mag**2 / 2
            return float(np.where(mag <= lam, inner, theta * lam**2 / 2).sum())
        raise AssertionError(name)

    return fn


def ref_lca(mat: np.ndarray, x: np.ndarray, thr: Callable, pen: Callable, eta: float, iters: int,
            u0: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[float, int, float]]]:
    """Numpy LCA on one flattened image; returns u and per-step (energy, ℓ0, mse) of T(u_k)."""
    u = np.zeros(mat.shape[1]) if u0 is None else u0.copy()
    rows: list[tuple[float, int, float]] = []

    def record(a: np.ndarray) -> None:
        r = x - mat @ a
        rows.append((0.5 * r @ r + pen(a), int(np.count_nonzero(a)), float(r @ r / len(x))))

    for _ in range(iters):
        a = thr(u)
        record(a)
        u = u + eta * (mat.T @ (x - mat @ a) + a - u)
    record(thr(u))
    return u, rows


def setup(stride: int, height: int, width: int, padding_mode: str = "zeros", k: int = 5,
          n_atoms: int = 4, channels: int = 2, batch: int = 2,
          seed: int = 0) -> tuple[ConvDictionary, torch.Tensor, np.ndarray]:
    d = ConvDictionary(n_atoms, channels, k, stride, padding_mode=padding_mode, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    mat = synthesis_matrix(d.weight.detach().numpy(), stride, height, width, padding_mode == "circular")
    return d, x, mat


GEOMETRIES = [(1, 7, 9), (1, 8, 8), (2, 7, 9), (2, 8, 8)]


# -- trajectories ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("padding_mode", "backend"),
                         [("zeros", "polyphase"), ("zeros", "direct"), ("circular", "polyphase")])
@pytest.mark.parametrize(("stride", "height", "width"), GEOMETRIES)
@pytest.mark.parametrize("threshold", ["hard", "soft"])
def test_trajectory_matches_dense_reference(stride: int, height: int, width: int, padding_mode: str,
                                            backend: str, threshold: str) -> None:
    d, x, mat = setup(stride, height, width, padding_mode)
    lam = 0.6
    lca = LCA(d, threshold=threshold, lam=lam, tau="auto", backend=backend)
    iters = 15
    res = lca(x, iters=iters, trace=True)
    eta = 1.0 / res.tau
    thr, pen = ref_threshold(threshold, lam), ref_penalty(threshold, lam)
    for b in range(x.shape[0]):
        u_ref, rows = ref_lca(mat, x[b].numpy().ravel(), thr, pen, eta, iters)
        np.testing.assert_allclose(res.u[b].numpy().ravel(), u_ref, atol=1e-10)
        np.testing.assert_allclose(res.a[b].numpy().ravel(), thr(u_ref), atol=1e-10)
        np.testing.assert_allclose(res.recon[b].numpy().ravel(), mat @ thr(u_ref), atol=1e-10)
        ref_e, ref_l0, ref_mse = (np.array(col) for col in zip(*rows, strict=True))
        np.testing.assert_allclose(res.trace["energy"][:, b].numpy(), ref_e, rtol=1e-10)
        np.testing.assert_array_equal(res.trace["l0"][:, b].numpy(), ref_l0)
        np.testing.assert_allclose(res.trace["mse"][:, b].numpy(), ref_mse, rtol=1e-10)
    assert (res.trace["l0"][-1] > 0).all(), "λ too large: nothing became active"


@pytest.mark.parametrize(("threshold", "nonneg", "theta"),
                         [("hard", True, 0.5), ("soft", True, 0.5), ("cel0", False, 0.3),
                          ("cel0", True, 0.7)])
def test_trajectory_other_thresholds(threshold: str, nonneg: bool, theta: float) -> None:
    d, x, mat = setup(2, 9, 7, k=3, n_atoms=5)
    lam, iters = 0.4, 10
    tau = 1.3 * d.operator_norm(9, 7)
    lca = LCA(d, threshold=threshold, lam=lam, tau=tau, nonneg=nonneg, theta=theta)
    res = lca(x, iters=iters, trace=True)
    thr, pen = ref_threshold(threshold, lam, nonneg, theta), ref_penalty(threshold, lam, theta)
    for b in range(x.shape[0]):
        u_ref, rows = ref_lca(mat, x[b].numpy().ravel(), thr, pen, 1.0 / tau, iters)
        np.testing.assert_allclose(res.u[b].numpy().ravel(), u_ref, atol=1e-10)
        np.testing.assert_allclose(res.trace["energy"][:, b].numpy(), [r[0] for r in rows], rtol=1e-10)
    if nonneg:
        assert (res.a >= 0).all()


def test_warm_start_trajectory_and_energy_function() -> None:
    d, x, mat = setup(2, 8, 8)
    lca = LCA(d, threshold="hard", lam=0.5, tau="auto")
    u0 = torch.randn(2, *d.code_shape(8, 8), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = lca(x, iters=7, u0=u0, trace=True)
    thr, pen = ref_threshold("hard", 0.5), ref_penalty("hard", 0.5)
    for b in range(2):
        u_ref, rows = ref_lca(mat, x[b].numpy().ravel(), thr, pen, 1.0 / res.tau, 7, u0[b].numpy().ravel())
        np.testing.assert_allclose(res.u[b].numpy().ravel(), u_ref, atol=1e-10)
        assert res.trace["energy"][0, b].item() == pytest.approx(rows[0][0], rel=1e-12)
    assert torch.equal(u0, u0.clone())  # u0 is not modified in place
    # lca.energy is the reference energy for arbitrary codes.
    a = torch.randn_like(u0) * (torch.rand_like(u0) > 0.7)
    expected = [0.5 * np.sum((x[b].numpy().ravel() - mat @ a[b].numpy().ravel()) ** 2)
                + pen(a[b].numpy()) for b in range(2)]
    np.testing.assert_allclose(lca.energy(x, a).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("stride", "channels", "height", "width", "padding_mode"), [
    (1, 1, 8, 8, "zeros"), (1, 1, 7, 9, "zeros"), (1, 1, 8, 12, "circular"), (1, 3, 8, 10, "zeros"),
    (2, 1, 8, 8, "zeros"), (2, 3, 9, 8, "circular")])
def test_float32_solver_matches_float64(stride: int, channels: int, height: int, width: int,
                                        padding_mode: str) -> None:
    """float32 runs other code paths (NHWC, conv2d decode, interleaved code grids at stride 1);
    the float64 ones are pinned to the dense reference above."""
    d64, x64, _ = setup(stride, height, width, padding_mode, k=5, n_atoms=3, channels=channels, seed=4)
    d32 = ConvDictionary.from_weights(d64.weight.detach().float(), stride=stride, padding_mode=padding_mode,
                                      normalize=False)
    x32 = x64.float()
    u0 = 0.5 * torch.randn(2, *d64.code_shape(height, width), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(8))
    tau = 1.2 * d64.operator_norm(height, width)
    kwargs = {"threshold": "soft", "lam": 0.3, "tau": tau}
    r64 = LCA(d64, **kwargs)(x64, iters=20, u0=u0, trace=True)
    r32 = LCA(d32, **kwargs)(x32, iters=20, u0=u0.float(), trace=True)
    torch.testing.assert_close(r32.u.double(), r64.u, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r32.recon.double(), r64.recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r32.trace["energy"].double(), r64.trace["energy"], rtol=1e-5, atol=1e-5)
    # gradients through the float32 paths agree with the float64 ones (checked by finite differences)
    grads = []
    for d, x, u in ((d64, x64, u0), (d32, x32, u0.float())):
        d.weight.grad = None
        res = LCA(d, **kwargs)(x, iters=5, u0=u, grad=True)
        (res.recon.square().sum() + res.u.sum()).backward()
        grads.append(d.weight.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)


# -- optimality and descent --------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_soft_codes_satisfy_lasso_kkt(padding_mode: str) -> None:
    d, x, mat = setup(1, 10, 10, padding_mode, k=5, n_atoms=4, channels=1, batch=2, seed=3)
    lam = 0.5
    lca = LCA(d, threshold="soft", lam=lam, tau="auto", tol=1e-11, check_every=50)
    res = lca(x, iters=20000)
    assert res.iters < 20000, "did not converge"
    for b in range(2):
        a = res.a[b].numpy().ravel()
        corr = mat.T @ (x[b].numpy().ravel() - mat @ a)
        active = a != 0
        assert 0 < active.sum() < a.size
        assert np.all(np.abs(corr[~active]) <= lam * (1 + 1e-6))
        np.testing.assert_allclose(corr[active], lam * np.sign(a[active]), atol=1e-6 * lam)


@pytest.mark.parametrize("tau_factor", [None, 1.0, 2.5])
@pytest.mark.parametrize(("stride", "padding_mode"), [(1, "zeros"), (2, "zeros"), (1, "circular")])
def test_soft_energy_never_increases(tau_factor: float | None, stride: int, padding_mode: str) -> None:
    d, x, _ = setup(stride, 12, 11, padding_mode, k=5, n_atoms=6, channels=1, batch=3, seed=1)
    tau = "auto" if tau_factor is None else tau_factor * d.operator_norm(12, 11)
    res = LCA(d, threshold="soft", lam=0.2, tau=tau)(x, iters=300, trace=True)
    energy = res.trace["energy"]
    steps = energy[1:] - energy[:-1]
    assert (steps <= 1e-12 * energy[:-1]).all(), steps.max()
    assert (energy[-1] < 0.5 * energy[0]).all()


def test_converged_states_are_fixed_points() -> None:
    d, x, _ = setup(1, 10, 10, k=5, n_atoms=4, channels=1, batch=2, seed=3)
    # soft: a converged state stays within the tolerance
    soft = LCA(d, threshold="soft", lam=0.5, tau="auto", tol=1e-12, check_every=25)
    first = soft(x, iters=20000)
    assert first.iters < 20000
    again = soft(x, iters=200, u0=first.u)
    assert again.iters <= 25
    rel = ((again.u - first.u).flatten(1).norm(dim=1) / first.u.flatten(1).norm(dim=1)).max()
    assert rel.item() < 1e-10
    # hard: the active set does not change and the state barely moves
    hard = LCA(d, threshold="hard", lam=0.5, tau="auto")
    first = hard(x, iters=4000)
    again = hard(x, iters=300, u0=first.u, trace=True)
    assert torch.equal(again.a != 0, first.a != 0)
    assert (again.u - first.u).abs().max().item() < 1e-6
    assert (first.a != 0).any()


# -- step size ---------------------------------------------------------------------------------------
def test_tau_auto_is_the_operator_norm() -> None:
    d, x, mat = setup(2, 16, 16, n_atoms=6, channels=3, k=7)
    res = LCA(d, threshold="hard", lam=0.5, tau="auto")(x, iters=2)
    assert res.tau == d.operator_norm(16, 16)
    assert res.tau == pytest.approx(top_eigenvalue(mat), rel=1e-6)


def test_unstable_tau_is_refused_with_the_bound() -> None:
    d = ConvDictionary(8, 1, 7, 1, seed=0).double()
    lip = d.operator_norm(32, 32)
    with pytest.raises(ValueError, match=r"unstable.*τ > L/2"):
        LCA(d, threshold="soft", lam=0.1, tau=0.45 * lip)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slow = LCA(d, threshold="soft", lam=0.1, tau=0.8 * lip)  # stable: accepted
        LCA(d, threshold="soft", lam=0.1, tau=1.01 * lip)(x, iters=2)
    with pytest.warns(UserWarning, match="energy may not decrease"):
        slow(x, iters=2)
    # The call-time check uses the actual image size: τ stable for 32×32 but not for 64×64.
    big = d.operator_norm(64, 64)
    assert big > lip
    between = LCA(d, threshold="soft", lam=0.1, tau=0.5 * (lip + big) / 2)
    with pytest.raises(ValueError, match=r"on 64×64 images"):
        between(torch.zeros(1, 1, 64, 64, dtype=torch.float64), iters=1)


# -- trace, early stop, gradients ----------------------------------------------------------------------
def test_trace_layout_and_consistency() -> None:
    d, x, _ = setup(2, 12, 12, n_atoms=6, channels=2, batch=3)
    lca = LCA(d, threshold="hard", lam=0.4, tau="auto")
    res = lca(x, iters=25, trace=True)
    assert set(res.trace) == {"energy", "l0", "mse"}
    for value in res.trace.values():
        assert value.shape == (26, 3)
    half_norm = 0.5 * x.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(res.trace["energy"][0], half_norm, rtol=1e-13, atol=0)
    assert (res.trace["l0"][0] == 0).all()
    energy = lca.energy(x, res.a)
    torch.testing.assert_close(res.trace["energy"][-1], energy, rtol=1e-13, atol=0)
    torch.testing.assert_close(res.energy, energy, rtol=1e-13, atol=0)
    torch.testing.assert_close(res.trace["mse"][-1], (x - res.recon).flatten(1).pow(2).mean(1))
    assert res.iters == 25 and not res.u.requires_grad
    # no trace: the same final state
    plain = lca(x, iters=25)
    assert plain.trace is None and torch.equal(plain.u, res.u)
    # zero steps: the start itself
    zero = lca(x, iters=0, trace=True)
    assert zero.iters == 0 and zero.trace["energy"].shape == (1, 3) and (zero.u == 0).all()


def test_tol_stops_early() -> None:
    d, x, _ = setup(1, 10, 10, n_atoms=4, channels=1, batch=2, seed=3)
    lca = LCA(d, threshold="soft", lam=0.3, tau="auto", tol=1e-4, check_every=5)
    res = lca(x, iters=5000, trace=True)
    assert res.iters < 5000 and res.iters % 5 == 0
    assert res.trace["energy"].shape == (res.iters + 1, 2)
    full = LCA(d, threshold="soft", lam=0.3, tau="auto")(x, iters=res.iters)
    torch.testing.assert_close(res.u, full.u, rtol=1e-12, atol=1e-12)


def test_grad_matches_finite_differences() -> None:
    d, x, _ = setup(2, 7, 7, k=3, n_atoms=3, channels=1, batch=2, seed=2)
    tau = 2.0 * d.operator_norm(7, 7)
    lca = LCA(d, threshold="soft", lam=0.3, tau=tau)
    gen = torch.Generator().manual_seed(9)
    probe = torch.randn(2, *d.code_shape(7, 7), dtype=torch.float64, generator=gen)

    def loss() -> torch.Tensor:
        res = lca(x, iters=6, grad=True)
        return (res.u * probe).sum() + res.recon.pow(2).sum()

    d.weight.grad = None
    loss().backward()
    grad = d.weight.grad.clone()
    assert grad.abs().sum() > 0
    eps = 1e-6
    flat = d.weight.data.view(-1)
    for idx in (0, 5, 13, 22, 26):
        old = flat[idx].item()
        with torch.no_grad():
            flat[idx] = old + eps
            up = loss().item()
            flat[idx] = old - eps
            down = loss().item()
            flat[idx] = old
        assert grad.view(-1)[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    # the default is inference: no graph
    assert not lca(x, iters=2).u.requires_grad


# -- input validation --------------------------------------------------------------------------------
def test_input_errors() -> None:
    d = ConvDictionary(4, 3, 5, 2, seed=0)
    lca = LCA(d, threshold="hard", lam=0.5, tau="auto")
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) \(rank 4\), got rank 3"):
        lca(x[0])
    with pytest.raises(ValueError, match="torch.Tensor"):
        lca(x.numpy())
    with pytest.raises(ValueError, match="has 1 channels but the dictionary expects 3"):
        lca(x[:, :1])
    with pytest.raises(ValueError, match=r"dtype torch.float64 but the dictionary has torch.float32"):
        lca(x.double())
    with pytest.raises(ValueError, match="is on meta but the dictionary is on cpu"):
        lca(torch.empty(2, 3, 16, 16, device="meta"))
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            lca(y)
    with pytest.raises(ValueError, match="empty"):
        lca(x[:0])
    with pytest.raises(ValueError, match=r"u0 must have shape \(2, 4, 8, 8\)"):
        lca(x, u0=torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="u0 must match x in dtype"):
        lca(x, u0=torch.zeros(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="u0 contains NaN"):
        lca(x, u0=torch.full((2, 4, 8, 8), math.nan))
    with pytest.raises(ValueError, match="iters must be an integer"):
        lca(x, iters=-1)
    with pytest.raises(ValueError, match=r"a must have shape \(2, 4, 8, 8\)"):
        lca.energy(x, torch.zeros(2, 4, 7, 7))
    assert lca.energy(x, torch.zeros(2, 4, 8, 8)).shape == (2,)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": -0.5}, r"lam=-0\.5: must be a finite number ≥ 0 \(the threshold λ"),
    ({"threshold": "lasso"}, "threshold=lasso: unknown threshold; known: hard, soft, cel0, half"),
    ({"tau": "fast"}, "tau=fast: must be a finite number > 0 or auto"),
    ({"tau": -1.0}, "tau=-1.0: must be a finite number > 0"),
    ({"tau": math.nan}, "tau=nan: must be a finite number > 0"),
    ({"iters": -3}, "iters=-3: must be an integer ≥ 0"),
    ({"tol": 0.0}, "tol=0.0: must be a finite number > 0 or null"),
    ({"backend": "fft"}, "backend=fft: unknown value; known: polyphase, direct"),
    ({"threshold": "cel0", "theta": 1.0}, r"theta=1\.0: must be a finite number > 0 and < 1"),
])
def test_constructor_errors(kwargs: dict, match: str) -> None:
    d = ConvDictionary(4, 1, 5, 1, seed=0)
    with pytest.raises(ValueError, match=match):
        LCA(d, **{"tau": "auto", **kwargs})


def test_even_kernel_and_non_dictionary_are_refused() -> None:
    with pytest.raises(ValueError, match="kernel_size=6: must be odd"):
        ConvDictionary(4, 1, 6, 1)
    with pytest.raises(ValueError, match="dictionary=<Tensor>: must be a ConvDictionary"):
        LCA(torch.randn(4, 1, 5, 5))  # type: ignore[arg-type]
