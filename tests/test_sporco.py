"""Soft-threshold LCA reaches sporco's convolutional BPDN optimum (circular boundaries, stride 1).

sporco (``admm.cbpdn.ConvBPDN``) solves min_x ½‖Σ_m d_m * x_m − s‖² + λ Σ_m ‖x_m‖₁ with FFTs, i.e.
periodic boundaries. Its code lives on a grid shifted by (k−1)/2 against ours (its atoms are
anchored at their top-left corner, ours at their centre); the objective is invariant to that
shift. sporco's reported objective is computed on the ADMM primal variable, so it is recomputed
here from the returned sparse code with sporco's own synthesis (``reconstruct``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from warplca.lca import LCA, ConvDictionary

sporco_cbpdn = pytest.importorskip("sporco.admm.cbpdn")
skdata = pytest.importorskip("skimage.data")

LAM = 0.1


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread for torch and BLAS/FFT pools: small problems, and a busy machine stalls pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, ConvDictionary]:
    """Four 24×24 zero-mean crops of the camera image in [0, 1] and 16 random unit-norm 5×5 atoms."""
    img = skdata.camera().astype(np.float64) / 255.0
    crops = np.stack([img[100 + 60 * i : 124 + 60 * i, 150 + 40 * i : 174 + 40 * i] for i in range(4)])
    crops -= crops.mean(axis=(1, 2), keepdims=True)
    d = ConvDictionary(16, 1, 5, 1, padding_mode="circular", seed=0).double()
    return crops, d


def sporco_solution(crops: np.ndarray, d: ConvDictionary, iters: int) -> tuple[float, np.ndarray]:
    """sporco ADMM: objective recomputed from the sparse code, and its reconstruction (N, H, W)."""
    filters = d.weight.detach().numpy()[:, 0].transpose(1, 2, 0).copy()  # (k, k, M)
    signals = crops.transpose(1, 2, 0).copy()  # (H, W, K images)
    opt = sporco_cbpdn.ConvBPDN.Options({"Verbose": False, "MaxMainIter": iters, "RelStopTol": 0.0,
                                         "AutoRho": {"Enabled": True}})
    solver = sporco_cbpdn.ConvBPDN(filters, signals, LAM, opt, dimK=1)
    code = solver.solve()  # (H, W, 1, K, M): the sparse variable Y
    recon = np.asarray(solver.reconstruct(code)).reshape(signals.shape)
    objective = 0.5 * np.sum((recon - signals) ** 2) + LAM * np.abs(code).sum()
    return float(objective), recon.transpose(2, 0, 1)


def test_soft_lca_reaches_sporco_optimum(problem: tuple[np.ndarray, ConvDictionary]) -> None:
    crops, d = problem
    target, sporco_recon = sporco_solution(crops, d, iters=500)
    lca = LCA(d, threshold="soft", lam=LAM, tau="auto")
    x = torch.from_numpy(crops[:, None].copy())
    res = lca(x, iters=1500, trace=True)
    ours = res.energy.sum().item()
    # within 0.1 % of the optimum, and not below it (the same objective, sporco converged)
    assert ours == pytest.approx(target, rel=1e-3)
    assert ours >= target * (1 - 1e-6)
    # the energy trace is the same objective
    assert res.trace["energy"][-1].sum().item() == pytest.approx(ours, rel=1e-12)
    # the lasso fit Φa is unique: the reconstructions agree
    rel = np.linalg.norm(res.recon[:, 0].numpy() - sporco_recon) / np.linalg.norm(sporco_recon)
    assert rel < 2e-2


def test_same_synthesis_as_sporco(problem: tuple[np.ndarray, ConvDictionary]) -> None:
    """Our code is sporco's rolled by +(k−1)/2 (sporco's is ours rolled by −(k−1)/2): same synthesis."""
    crops, d = problem
    filters = d.weight.detach().numpy()[:, 0].transpose(1, 2, 0).copy()
    signals = crops.transpose(1, 2, 0).copy()
    opt = sporco_cbpdn.ConvBPDN.Options({"Verbose": False, "MaxMainIter": 1})
    solver = sporco_cbpdn.ConvBPDN(filters, signals, LAM, opt, dimK=1)
    gen = np.random.default_rng(0)
    code = gen.standard_normal((24, 24, 1, 4, 16))  # sporco layout (H, W, C, K, M)
    theirs = np.asarray(solver.reconstruct(code)).reshape(24, 24, 4).transpose(2, 0, 1)
    ours_code = torch.from_numpy(np.roll(code[:, :, 0].transpose(2, 3, 0, 1), 2, axis=(-2, -1)).copy())
    with torch.no_grad():
        ours = d.decode(ours_code)[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
