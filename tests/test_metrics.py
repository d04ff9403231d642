"""torchmetrics metrics: sparsity, energy, PSNR/SSIM on the pixel scale, plotting helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.plotting import atom_grid, image_grid, save_png


def test_sparsity_counts_nonzeros_over_batches() -> None:
    m = SparsityMetric()
    a1 = torch.tensor([[[0.0, 1.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (2, 2, 2): 2 + 0 non-zeros
    a2 = torch.tensor([[[3.0, -1.0], [4.0, 0.0]]])  # (1, 2, 2): 3 non-zeros
    m.update(a1)
    m.update(a2)
    out = m.compute()
    assert out["l0_frac"].item() == pytest.approx(5 / 12)
    assert out["l0_per_image"].item() == pytest.approx(5 / 3)
    m.reset()
    m.update(torch.zeros(4, 3))
    assert m.compute()["l0_frac"].item() == 0.0


def test_sparsity_rejects_scalars() -> None:
    with pytest.raises(ValueError, match="codes of shape"):
        SparsityMetric().update(torch.tensor(1.0))


def test_energy_mean_and_normalised() -> None:
    m = EnergyMetric()
    m.update(torch.tensor([2.0, 4.0]), numel_per_image=4)
    m.update(torch.tensor([6.0]), numel_per_image=4)
    out = m.compute()
    assert out["energy"].item() == pytest.approx(4.0)
    assert out["energy_norm"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="per-image energies"):
        m.update(torch.ones(2, 2), 4)
    with pytest.raises(ValueError, match="numel_per_image"):
        m.update(torch.ones(2), 0)


def test_states_merge_like_a_ddp_sum() -> None:
    """Two ranks' states summed (what dist_reduce_fx='sum' does) equal one metric that saw everything."""
    a = torch.randn(6, 4, 5, 5).where(torch.rand(6, 4, 5, 5) > 0.7, torch.tensor(0.0))
    e = torch.rand(6) * 10
    whole_s, whole_e = SparsityMetric(), EnergyMetric()
    whole_s.update(a)
    whole_e.update(e, 100)
    parts_s, parts_e = [SparsityMetric(), SparsityMetric()], [EnergyMetric(), EnergyMetric()]
    for i, (ps, pe) in enumerate(zip(parts_s, parts_e, strict=True)):
        ps.update(a[3 * i: 3 * i + 3])
        pe.update(e[3 * i: 3 * i + 3], 100)
    parts_s[0].merge_state(parts_s[1])
    parts_e[0].merge_state(parts_e[1])
    for got, want in ((parts_s[0].compute(), whole_s.compute()), (parts_e[0].compute(), whole_e.compute())):
        for key in want:
            assert got[key].item() == pytest.approx(want[key].item())


def test_psnr_is_mean_per_image_on_unit_range() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 16, 16, generator=gen)
    noise = torch.stack([s * torch.randn(3, 16, 16, generator=gen) for s in (0.01, 0.05, 0.1, 0.2)])
    preds = (target + noise).clamp(0, 1)
    m = reconstruction_metrics(prefix="val/")
    m.update(preds[:2], target[:2])
    m.update(preds[2:], target[2:])
    out = m.compute()
    assert set(out) == {"val/psnr", "val/ssim"}
    mse = (preds - target).pow(2).flatten(1).mean(1)
    expected = (10 * torch.log10(1.0 / mse)).mean().item()
    assert out["val/psnr"].item() == pytest.approx(expected, rel=1e-4)
    perfect = reconstruction_metrics()
    perfect.update(target, target)
    assert perfect.compute()["ssim"].item() == pytest.approx(1.0, abs=1e-4)
    assert math.isfinite(out["val/ssim"].item()) and 0 < out["val/ssim"].item() < 1


def test_atom_grid_is_symmetric_around_grey() -> None:
    w = torch.zeros(4, 3, 5, 5)
    w[0, :, 2, 2] = 2.0
    w[1, :, 2, 2] = -0.5
    grid = atom_grid(w)
    assert grid.ndim == 3 and grid.shape[-1] == 3
    assert grid.dtype == np.float32 and grid.min() >= 0.0 and grid.max() <= 1.0
    # 2x2 tiles of 5x5 with 1 px padding: (2*6+1) square
    assert grid.shape[:2] == (13, 13)
    assert grid[1 + 2, 1 + 2, 0] == pytest.approx(1.0)  # positive peak -> white
    assert grid[1 + 2, 7 + 2, 0] == pytest.approx(0.0)  # negative peak -> black
    assert grid[1, 1, 0] == pytest.approx(0.5)  # zero -> mid grey
    gray = atom_grid(torch.randn(6, 1, 3, 3))
    assert gray.shape[-1] == 3


def test_image_grid_and_png(tmp_path) -> None:
    grid = image_grid(torch.rand(5, 1, 8, 8), ncol=5)
    assert grid.shape == (10, 46, 3)
    with pytest.raises(ValueError, match="channels"):
        image_grid(torch.rand(2, 2, 8, 8))
    path = save_png(grid, tmp_path / "sub" / "g.png")
    assert path.is_file() and path.stat().st_size > 0
    save_png((grid * 255).astype(np.uint8), tmp_path / "u8.png")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_png(fig, tmp_path / "fig.png").is_file()
    assert not list(tmp_path.rglob("*.tmp.png"))
