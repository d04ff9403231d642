"""WarpCNN: exact code-grid output for any input size, drive modes, config round trip, presets."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from warplca import ConvDictionary, WarpCNN
from warplca.config import compose_config


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("size", [(1, 1), (8, 8), (15, 17), (32, 31), (33, 33)])
def test_output_is_the_code_grid(stride: int, size: tuple[int, int]) -> None:
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=stride)
    net = WarpCNN(3, 6, stride, width=8, depth=2)
    x = torch.randn(2, 3, *size)
    assert tuple(net(x).shape) == (2, *d.code_shape(*size))


@pytest.mark.parametrize("mode", ["concat", "residual"])
def test_drive_modes(mode: str) -> None:
    d = ConvDictionary(n_atoms=6, in_channels=1, kernel_size=5, stride=2)
    net = WarpCNN(1, 6, 2, width=8, depth=2, use_drive=True, drive_mode=mode, drive_scale=1.0)
    x = torch.randn(2, 1, 13, 10)
    drive = d.encode(x).detach()
    assert net(x, drive).shape == drive.shape
    with pytest.raises(ValueError, match="drive"):
        net(x)
    if mode == "residual":
        with torch.no_grad():
            net.head[-1].weight.zero_()
            net.head[-1].bias.zero_()
        assert torch.equal(net(x, drive), drive)  # û = Φᵀx + f(x), f = 0


def test_residual_drive_scale_auto_is_the_first_cold_step() -> None:
    """drive_scale = 1/L with a zero network: û is exactly cold LCA's state after one step (τ = L)."""
    from warplca import LCA

    d = ConvDictionary(n_atoms=6, in_channels=1, kernel_size=5, stride=2, seed=3)
    lca = LCA(d, lam=0.2, tau="auto")
    x = torch.randn(2, 1, 12, 12)
    tau = lca.resolve_tau(12, 12)
    net = WarpCNN(1, 6, 2, width=8, depth=2, use_drive=True, drive_mode="residual", drive_scale=1.0 / tau)
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.zero_()
        first = lca(x, iters=1).u
        torch.testing.assert_close(net(x, d.encode(x)), first, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="drive_scale"):
        WarpCNN(1, 6, 2, drive_scale=0.0)


def test_predictions_do_not_depend_on_the_batch() -> None:
    net = WarpCNN(3, 4, 2, width=8, depth=3)
    x = torch.randn(5, 3, 12, 12)
    assert torch.allclose(net(x)[2:3], net(x[2:3]), atol=1e-6)


def test_config_round_trip() -> None:
    net = WarpCNN(3, 10, 2, width=12, depth=4, kernel_size=5, use_drive=True, drive_mode="residual",
                  stem_kernel_size=7, activation="silu", drive_scale=0.25)
    clone = WarpCNN(**net.config())
    clone.load_state_dict(net.state_dict())
    x, drive = torch.randn(1, 3, 9, 9), torch.randn(1, 10, 5, 5)
    assert torch.equal(net(x, drive), clone(x, drive))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kernel_size=4: must be odd"):
        WarpCNN(3, 8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="drive_mode=add: unknown value; known: concat, residual"):
        WarpCNN(3, 8, 2, drive_mode="add")
    with pytest.raises(ValueError, match="n_atoms=0: must be an integer ≥ 1"):
        WarpCNN(3, 0, 2)
    with pytest.raises(ValueError, match="drive_scale=auto needs the dictionary"):
        WarpCNN(3, 8, 2, use_drive=True)
    with pytest.raises(ValueError, match="expects images"):
        WarpCNN(3, 8, 2)(torch.randn(1, 1, 8, 8))


def test_presets_instantiate_with_growing_size() -> None:
    counts = {}
    for name in ("small", "medium", "large"):
        conf = compose_config([f"predictor={name}"], output_dir="/tmp/unused").predictor
        assert conf.drive_scale == "auto"  # the framework turns it into 1/‖Φ‖²_op (predictor_fit)
        net = instantiate(conf, in_channels=3, n_atoms=64, stride=2)
        assert isinstance(net, WarpCNN)
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 64, 16, 16)
        counts[name] = net.num_parameters()
    assert counts["small"] < counts["medium"] < counts["large"]
