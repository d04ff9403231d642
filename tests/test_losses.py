"""Regression losses: the project's Laplacian loss, its MSE limit, its weighting and overflow guard."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from warplca import LCA, ConvDictionary
from warplca.losses import (
    LOSSES,
    build_loss,
    coding_energy,
    l1_loss,
    laplacian_loss,
    laplacian_weights,
    mse_loss,
)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.distributions.Laplace(0.0, 0.5).sample((4, 8, 5, 5))
    pred = target + 0.3 * torch.randn(target.shape, generator=g)
    return pred, target


def test_laplacian_matches_its_definition() -> None:
    pred, target = _pair()
    lam, gamma = 0.4, 3.0
    p, t = pred.double(), target.double()
    w = torch.exp(t.abs() / (gamma * lam))
    expected = (w * (p - t) ** 2).sum() / w.sum()
    got = laplacian_loss(pred, target, lam, gamma)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_laplacian_tends_to_mse_as_gamma_grows() -> None:
    pred, target = _pair()
    mse = mse_loss(pred, target).item()
    gaps = [abs(laplacian_loss(pred, target, 0.5, g).item() - mse) for g in (1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 1e-3 * mse
    assert laplacian_loss(pred, target, 0.5, math.inf).item() == pytest.approx(mse, rel=1e-6)


def test_small_gamma_weights_large_states_more() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, 0] = 3.0  # one large (active) state among near-zero ones
    err_big, err_small = target.clone(), target.clone()
    err_big[0, 0, 0, 0] += 0.5
    err_small[0, 0, 2, 2] += 0.5
    assert mse_loss(err_big, target).item() == pytest.approx(mse_loss(err_small, target).item())
    ratio = [laplacian_loss(err_big, target, 1.0, g).item() / laplacian_loss(err_small, target, 1.0, g).item()
             for g in (0.5, 1.0, 3.0)]
    assert ratio[0] > ratio[1] > ratio[2] > 1.0


def test_no_overflow_for_huge_states() -> None:
    target = torch.tensor([0.0, 1e4, -5e4, 1e-3]).view(1, 4, 1, 1)
    pred = target + 1.0
    loss = laplacian_loss(pred, target, lam=1e-3, gamma=1.0)  # |u|/(γλ) up to 5e7: exp would overflow
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1.0)
    w = laplacian_weights(target, 1e-3, 1.0)
    assert torch.isfinite(w).all() and w.max().item() == 1.0


def test_weights_carry_no_gradient() -> None:
    pred, target = _pair()
    pred.requires_grad_(True)
    target.requires_grad_(True)
    laplacian_loss(pred, target, 0.5).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # d/dtarget only through the squared error: equals minus d/dpred
    assert torch.allclose(target.grad, -pred.grad)


@pytest.mark.parametrize("name", LOSSES)
def test_build_loss(name: str) -> None:
    pred, target = _pair()
    fn = build_loss(name, lam=0.5, gamma=3.0)
    ref = {"laplacian": laplacian_loss(pred, target, 0.5, 3.0), "mse": mse_loss(pred, target),
           "l1": l1_loss(pred, target)}[name]
    assert fn(pred, target).item() == pytest.approx(ref.item())
    restored = pickle.loads(pickle.dumps(fn))  # ddp_spawn pickles the module and its loss
    assert restored(pred, target).item() == pytest.approx(ref.item())


def test_build_loss_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("huber", lam=1.0)
    with pytest.raises(ValueError, match="λ > 0"):
        build_loss("laplacian", lam=0.0)
    with pytest.raises(ValueError, match="gamma"):
        build_loss("laplacian", lam=1.0, gamma=-1.0)
    with pytest.raises(ValueError, match="shape"):
        mse_loss(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize(("threshold", "nonneg"), [("hard", False), ("hard", True), ("soft", False),
                                                   ("cel0", False), ("half", False)])
def test_coding_energy_is_the_lca_energy(threshold: str, nonneg: bool) -> None:
    """Its value is the energy LCA reports for the codes T_λ(u), for every threshold; a finite gradient."""
    d = ConvDictionary(n_atoms=5, in_channels=3, kernel_size=5, stride=2, seed=0)
    lca = LCA(d, threshold=threshold, lam=0.1, nonneg=nonneg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 12, 12, generator=g) - 0.5
    u = (0.2 * torch.randn(3, *d.code_shape(12, 12), generator=g)).requires_grad_(True)
    energy = coding_energy(x, u, d, lca.threshold)
    assert torch.allclose(energy, lca.energy(x, lca.threshold(u.detach())), rtol=1e-5, atol=1e-5)
    energy.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    # under bf16 autocast (trainer.precision=bf16-mixed) it stays the float32 energy, like the solver
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = coding_energy(x, u.detach(), d, lca.threshold)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, energy.detach())


def test_coding_energy_gradient_descends_the_hard_energy() -> None:
    """Plain gradient steps on u along the straight-through gradient lower the exact hard-threshold energy."""
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=1, seed=0)
    lca = LCA(d, threshold="hard", lam=0.1)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2)) - 0.5
    u = d.encode(x).detach().requires_grad_(True)
    start = float(lca.energy(x, lca.threshold(u.detach())).mean())
    opt = torch.optim.SGD([u], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        coding_energy(x, u, d, lca.threshold).mean().backward()
        opt.step()
    end = float(lca.energy(x, lca.threshold(u.detach())).mean())
    assert end < 0.8 * start, (start, end)


def test_coding_energy_refuses_bad_input() -> None:
    d = ConvDictionary(n_atoms=4, in_channels=1, kernel_size=3, seed=0)
    lca = LCA(d, threshold="hard", lam=0.1)
    with pytest.raises(ValueError, match="state maps"):
        coding_energy(torch.zeros(2, 1, 8, 8), torch.zeros(3, 4, 8, 8), d, lca.threshold)
    with pytest.raises(ValueError, match="temperature"):
        coding_energy(torch.zeros(2, 1, 8, 8), torch.zeros(2, 4, 8, 8), d, lca.threshold, temperature=0.0)
