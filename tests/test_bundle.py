"""WarpLCA bundle: warm vs cold with the same settings, save/load, refusals, input validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from warplca import LCA, ConvDictionary, WarpCNN, WarpLCA
from warplca.data.normalization import Normalization


def _model(use_drive: bool = False, normalization: Normalization | None = None) -> WarpLCA:
    torch.manual_seed(0)
    d = ConvDictionary(n_atoms=8, in_channels=3, kernel_size=5, stride=2, seed=1)
    lca = LCA(d, threshold="hard", lam=0.2, tau="auto")
    net = WarpCNN(3, 8, 2, width=8, depth=2, use_drive=use_drive, drive_mode="residual", drive_scale=1.0)
    return WarpLCA(d, net, lca, normalization)


def _images(n: int = 3, h: int = 13, w: int = 15) -> Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(2))


def test_warm_and_cold_use_the_same_solver() -> None:
    model = _model()
    x = _images()
    cold = model(x, iters=7, warm=False)
    ref = model.lca(x, iters=7)
    assert torch.equal(cold.u, ref.u) and torch.equal(cold.recon, ref.recon)
    warm = model(x, iters=7, trace=True)
    ref_warm = model.lca(x, iters=7, u0=model.initial_states(x))  # the guarded start
    assert torch.equal(warm.u, ref_warm.u)
    unguarded = WarpLCA(model.dictionary, model.predictor, model.lca, start_guard=False)
    raw = unguarded(x, iters=7)
    assert torch.equal(raw.u, model.lca(x, iters=7, u0=model.predictor(x).detach()).u)
    assert warm.trace is not None and warm.trace["energy"].shape == (8, 3)
    assert model(x, iters=0).u.shape == (3, *model.dictionary.code_shape(13, 15))


@pytest.mark.parametrize("use_drive", [False, True])
def test_save_load_gives_identical_outputs(tmp_path: Path, use_drive: bool) -> None:
    norm = Normalization(mean=(0.4, 0.5, 0.6), scale=0.5)
    model = _model(use_drive, norm)
    path = model.save(tmp_path / "warp_lca.pt", note="test")
    loaded = WarpLCA.load(path)
    x = model.preprocess(_images())
    for warm in (True, False):
        a, b = model(x, iters=5, warm=warm), loaded(x, iters=5, warm=warm)
        assert torch.equal(a.u, b.u) and torch.equal(a.a, b.a) and torch.equal(a.recon, b.recon)
    assert torch.equal(model.predict_states(x), loaded.predict_states(x))
    assert loaded.lca.settings() == model.lca.settings()
    assert loaded.normalization == norm
    assert loaded.predictor.config() == model.predictor.config()
    assert loaded.meta == {"note": "test"}


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    model = _model()
    path = model.save(tmp_path / "warp_lca.pt")
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        WarpLCA.load(cut)
    foreign = model.dictionary.save(tmp_path / "dictionary.pt")
    with pytest.raises(ValueError, match=r"dictionary\.pt.*not a warplca.bundle"):
        WarpLCA.load(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        WarpLCA.load(tmp_path / "missing.pt")


class _Spy(nn.Module):
    """A predictor that records calls (input validation must happen before it runs)."""

    def __init__(self, inner: WarpCNN) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0
        self.in_channels, self.n_atoms, self.stride, self.use_drive = (inner.in_channels, inner.n_atoms,
                                                                       inner.stride, False)

    def forward(self, x: Tensor, drive: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.inner(x)


def test_bad_input_is_refused_before_the_predictor_runs() -> None:
    base = _model()
    spy = _Spy(base.predictor)
    model = WarpLCA(base.dictionary, spy, base.lca)
    bad = {"rank": torch.rand(3, 13, 13), "channels": torch.rand(1, 1, 13, 13),
           "dtype": torch.rand(1, 3, 13, 13, dtype=torch.float64)}
    nan = torch.rand(1, 3, 13, 13)
    nan[0, 0, 3, 3] = float("nan")
    bad["nan"] = nan
    for name, x in bad.items():
        with pytest.raises(ValueError):
            model(x)
        with pytest.raises(ValueError):
            model.predict_states(x)
        assert spy.calls == 0, name
    model(torch.rand(1, 3, 13, 13), iters=1)
    assert spy.calls == 1


def test_mismatched_parts_are_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="does not fit"):
        WarpLCA(model.dictionary, WarpCNN(3, 9, 2))
    with pytest.raises(ValueError, match="same dictionary"):
        WarpLCA(model.dictionary, model.predictor, LCA(ConvDictionary(8, 3, 5, 2)))
    with pytest.raises(ValueError, match="channels"):
        WarpLCA(model.dictionary, model.predictor, model.lca, Normalization(mean=(0.5,)))


def test_pre_and_postprocess() -> None:
    norm = Normalization(mean=(0.2, 0.4, 0.6), scale=0.5)
    model = _model(normalization=norm)
    images = _images()
    assert torch.allclose(model.postprocess(model.preprocess(images)), images, atol=1e-6)
    assert model.postprocess(torch.full((1, 3, 4, 4), 10.0)).max() == 1.0  # clamped to [0, 1]
    plain = _model()
    assert torch.equal(plain.preprocess(images), images)


class _Oracle(nn.Module):
    """Predicts given states (the converged cold ones)."""

    def __init__(self, states: Tensor, like: WarpCNN) -> None:
        super().__init__()
        self.states = states
        self.in_channels, self.n_atoms, self.stride, self.use_drive = (like.in_channels, like.n_atoms,
                                                                       like.stride, False)

    def forward(self, x: Tensor, drive: Tensor | None = None) -> Tensor:
        return self.states.clone()


def test_warm_start_from_the_converged_states_stays_at_the_cold_optimum() -> None:
    base = _model()
    x = _images(2, 12, 12) - 0.5
    cold = base(x, iters=600, warm=False)  # converged to float precision (~400 steps)
    assert cold.energy is not None
    model = WarpLCA(base.dictionary, _Oracle(cold.u, base.predictor), base.lca)
    warm = model(x, iters=20)
    assert warm.energy is not None
    assert torch.equal(warm.a != 0, cold.a != 0)  # the same support
    assert torch.allclose(warm.a, cold.a, atol=1e-4)
    assert torch.allclose(warm.energy, cold.energy, rtol=1e-5)
    assert torch.allclose(model(x, iters=0).energy, cold.energy, rtol=1e-6)  # type: ignore[arg-type]


# -- the start guard: WARP-LCA never starts above cold LCA's energy ½‖x‖² ---------------------------
class _Scaled(nn.Module):
    """A predictor that returns the cold-converged states, times a per-image factor."""

    def __init__(self, states: Tensor, factors: list[float], like: WarpCNN) -> None:
        super().__init__()
        self.states = states * torch.tensor(factors).view(-1, 1, 1, 1)
        self.in_channels, self.n_atoms, self.stride, self.use_drive = (like.in_channels, like.n_atoms,
                                                                       like.stride, False)

    def forward(self, x: Tensor, drive: Tensor | None = None) -> Tensor:
        return self.states.clone()


def _guard_case(factors: list[float], start_guard: bool = True) -> tuple[WarpLCA, Tensor, Tensor]:
    base = _model()
    x = _images(len(factors), 12, 12) - 0.5
    cold = base(x, iters=200, warm=False)
    model = WarpLCA(base.dictionary, _Scaled(cold.u, factors, base.predictor), base.lca,
                    start_guard=start_guard)
    return model, x, 0.5 * x.flatten(1).square().sum(1)


def test_start_guard_sends_huge_predictions_back_to_the_cold_start() -> None:
    model, x, half_norm = _guard_case([1e4, 1e4, 1e4])
    start = model.warm_start(x)
    assert start.guarded is not None and start.guarded.tolist() == [True, True, True]
    assert bool((start.energy > start.cold_energy).all())  # type: ignore[operator]
    assert torch.equal(model.initial_states(x), torch.zeros_like(start.states))
    e0 = model(x, iters=0, trace=True).trace["energy"][0]  # type: ignore[index]
    torch.testing.assert_close(e0, half_norm, rtol=1e-5, atol=1e-6)
    # a broken prediction is refused as the solver would, not hidden by the guard
    model.predictor.states[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="u0 contains NaN or Inf"):
        model(x, iters=1)
    # the same predictor without the guard starts far above ½‖x‖²
    off, _, _ = _guard_case([1e4, 1e4, 1e4], start_guard=False)
    assert off.warm_start(x).guarded is None
    assert bool((off(x, iters=0).energy > 10 * half_norm).all())  # type: ignore[operator]


def test_start_guard_leaves_good_predictions_alone_per_image() -> None:
    model, x, half_norm = _guard_case([1.0, 1e4, 1.0])
    start = model.warm_start(x)
    assert start.guarded is not None and start.guarded.tolist() == [False, True, False]
    raw = model.predict_states(x)
    # the guard's energies are the solver's
    codes = model.lca.states_to_codes(raw)
    torch.testing.assert_close(start.energy, model.lca.energy(x, codes), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(start.cold_energy, half_norm, rtol=1e-5, atol=1e-6)
    u0 = model.initial_states(x)
    assert torch.equal(u0[0], raw[0]) and torch.equal(u0[2], raw[2]) and not u0[1].any()
    e0 = model(x, iters=0).energy
    assert e0 is not None and bool((e0 <= half_norm).all())
    assert float(e0[0]) < 0.9 * float(half_norm[0])  # the good start is kept (well below cold)
    torch.testing.assert_close(e0[1], half_norm[1], rtol=1e-5, atol=1e-6)
    # a prediction below the threshold everywhere has exactly the cold energy: kept, not counted
    tiny, x2, _ = _guard_case([1e-9, 1e-9])
    assert tiny.warm_start(x2).guarded.tolist() == [False, False]  # type: ignore[union-attr]


def test_start_guard_is_saved_and_old_bundles_load_with_it_on(tmp_path: Path) -> None:
    from warplca.bundle import FORMAT
    from warplca.serialization import save_atomic

    model = _model()
    assert model.start_guard is True
    off = WarpLCA(model.dictionary, model.predictor, model.lca, start_guard=False)
    assert WarpLCA.load(off.save(tmp_path / "off.pt")).start_guard is False
    assert WarpLCA.load(model.save(tmp_path / "on.pt")).start_guard is True
    payload = model.to_payload()
    del payload["start_guard"]  # a bundle written before the option existed
    save_atomic({**payload, "meta": {}}, tmp_path / "old.pt", FORMAT)
    old = WarpLCA.load(tmp_path / "old.pt")
    assert old.start_guard is True
    x = _images()
    assert torch.equal(old(x, iters=3).u, model(x, iters=3).u)
    with pytest.raises(ValueError, match="start_guard"):
        WarpLCA(model.dictionary, model.predictor, model.lca, start_guard="yes")  # type: ignore[arg-type]


def test_a_bundle_from_before_the_norm_group_loads_as_dataset_mean(tmp_path: Path) -> None:
    """Bundles written before normalisation kinds existed saved only ``mean`` and ``scale``: they load,
    undo the dataset mean as they did then, and reconstruct exactly as the same model built today."""
    from warplca.bundle import FORMAT
    from warplca.serialization import save_atomic

    norm = Normalization(mean=(0.4, 0.5, 0.6), scale=2.0, kind="dataset_mean")
    model = _model(normalization=norm)
    payload = model.to_payload()
    payload["normalization"] = {"mean": [0.4, 0.5, 0.6], "scale": 2.0}  # the old layout
    save_atomic({**payload, "meta": {}}, tmp_path / "old.pt", FORMAT)
    old = WarpLCA.load(tmp_path / "old.pt")
    assert old.normalization is not None and old.normalization.kind == "dataset_mean"
    x = _images()
    assert torch.equal(old.code(x, iters=4).pixels, model.code(x, iters=4).pixels)
