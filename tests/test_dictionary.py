"""ConvDictionary against an explicit dense synthesis matrix, plus geometry, norm and persistence.

The reference matrix A is built by Python loops over (atom, code position, channel, kernel offset)
from the definition (README, "The maths"): atom m at code position (i, j) puts Φ[m, c, dy, dx] on pixel
(c, s·i + dy − p, s·j + dx − p) — dropped outside the image for zero padding, wrapped modulo
(H, W) for circular padding. Nothing here calls the operators to build the reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from warplca.lca import ConvDictionary
from warplca.lca.operator import make_operator


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny problems: one thread (torch and BLAS) avoids stalls of thread pools on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


GEOMETRIES = [  # (stride, H, W)
    (1, 7, 9),
    (1, 8, 8),
    (2, 7, 9),
    (2, 8, 8),
    (3, 10, 7),
]


def synthesis_matrix(weight: np.ndarray, stride: int, height: int, width: int, circular: bool) -> np.ndarray:
    """Dense A with Φa = A @ a.ravel() for codes (K, ⌈H/s⌉, ⌈W/s⌉) and images (C, H, W), C-order."""
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


def make_dict(stride: int, padding_mode: str = "zeros", k: int = 5, n_atoms: int = 3, channels: int = 2,
              seed: int = 0) -> ConvDictionary:
    return ConvDictionary(n_atoms, channels, k, stride, padding_mode=padding_mode, seed=seed).double()


#: operator variants: (backend, interleave, transposed_decode); None = automatic choice
VARIANTS = [("direct", None, None), ("polyphase", 1, False), ("polyphase", 1, True),
            ("polyphase", 2, False), ("polyphase", 2, True)]


def _applicable(stride: int, height: int, width: int, padding_mode: str, interleave: int | None) -> bool:
    """Interleave 2 needs a code grid (zeros) or an image (circular) divisible by its block."""
    if interleave != 2:
        return True
    if padding_mode == "circular":
        return height % (2 * stride) == 0 and width % (2 * stride) == 0
    return -(-height // stride) % 2 == 0 and -(-width // stride) % 2 == 0


OPERATOR_CASES = [
    pytest.param(geom, variant, mode, id=f"{mode}-{name}-s{geom[0]}-{geom[1]}x{geom[2]}")
    for geom in [*GEOMETRIES, (2, 7, 8), (1, 12, 6)]
    for variant, name in zip(VARIANTS, ["direct", "poly", "poly-T", "poly-r2", "poly-r2-T"], strict=True)
    for mode in ("zeros", "circular")
    if _applicable(*geom, mode, variant[1])
]


@pytest.mark.parametrize(("geometry", "variant", "padding_mode"), OPERATOR_CASES)
def test_decode_encode_match_dense_matrix(geometry: tuple[int, int, int], variant: tuple,
                                          padding_mode: str) -> None:
    stride, height, width = geometry
    backend, interleave, transposed = variant
    d = make_dict(stride, padding_mode)
    mat = synthesis_matrix(d.weight.detach().numpy(), stride, height, width, padding_mode == "circular")
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(2, *d.code_shape(height, width), generator=gen, dtype=torch.float64)
    images = torch.randn(2, 2, height, width, generator=gen, dtype=torch.float64)
    op = make_operator(d.weight.detach(), stride, height, width, padding_mode, backend, interleave=interleave,
                       transposed_decode=transposed)
    recon = op.image(op.decode(op.to_grid(codes)))
    drive = op.from_grid(op.encode(op.pixels(images)))
    assert recon.shape == images.shape and drive.shape == codes.shape
    for b in range(2):
        np.testing.assert_allclose(recon[b].numpy().ravel(), mat @ codes[b].numpy().ravel(), atol=1e-12)
        np.testing.assert_allclose(drive[b].numpy().ravel(), mat.T @ images[b].numpy().ravel(), atol=1e-12)
    # The public encode / decode (automatic choice) agree too.
    with torch.no_grad():
        np.testing.assert_allclose(d.decode(codes, size=(height, width)).numpy(), recon.numpy(), atol=1e-12)
        np.testing.assert_allclose(d.encode(images).numpy(), drive.numpy(), atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize(("stride", "channels", "height", "width"),
                         [(1, 1, 8, 8), (1, 1, 7, 9), (2, 1, 8, 8), (1, 3, 8, 10), (2, 3, 8, 8)])
def test_float32_operators_match_dense_matrix(stride: int, channels: int, height: int, width: int,
                                              padding_mode: str) -> None:
    """float32 takes other code paths (NHWC, conv2d decode, interleaved grids for thin blocks)."""
    d = ConvDictionary(3, channels, 5, stride, padding_mode=padding_mode, seed=0)
    mat = synthesis_matrix(d.weight.detach().double().numpy(), stride, height, width,
                           padding_mode == "circular")
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(2, *d.code_shape(height, width), generator=gen)
    images = torch.randn(2, channels, height, width, generator=gen)
    with torch.no_grad():
        recon = d.decode(codes, size=(height, width))
        drive = d.encode(images)
    for b in range(2):
        np.testing.assert_allclose(recon[b].numpy().ravel(), mat @ codes[b].double().numpy().ravel(),
                                   atol=2e-5)
        np.testing.assert_allclose(drive[b].numpy().ravel(), mat.T @ images[b].double().numpy().ravel(),
                                   atol=2e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize(("stride", "height", "width"), GEOMETRIES)
def test_encode_is_adjoint_of_decode(stride: int, height: int, width: int, padding_mode: str) -> None:
    d = make_dict(stride, padding_mode, k=7 if height > 7 else 5, n_atoms=4, channels=3, seed=3)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, *d.code_shape(height, width), generator=gen, dtype=torch.float64)
    r = torch.randn(3, 3, height, width, generator=gen, dtype=torch.float64)
    lhs = (d.decode(a, size=(height, width)) * r).sum()
    rhs = (a * d.encode(r)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12, abs=1e-12)


def test_decode_default_size_and_shape_check() -> None:
    d = make_dict(2)
    a = torch.zeros(1, *d.code_shape(8, 8), dtype=torch.float64)
    assert d.decode(a).shape == (1, 2, 8, 8)
    assert d.code_shape(7, 9) == (3, 4, 5)
    with pytest.raises(ValueError, match=r"do not belong to 9×9 images with stride 2"):
        d.decode(a, size=(9, 9))


def test_single_atom_decodes_to_the_atom() -> None:
    d = make_dict(1, k=5, n_atoms=3, channels=2)
    a = torch.zeros(1, 3, 11, 11, dtype=torch.float64)
    a[0, 1, 5, 5] = 2.0
    out = d.decode(a)
    torch.testing.assert_close(out[0, :, 3:8, 3:8], 2.0 * d.weight[1].detach())
    assert out.abs().sum().item() == pytest.approx(2.0 * d.weight[1].abs().sum().item())


@pytest.mark.parametrize(("stride", "padding_mode", "height", "width"),
                         [(1, "zeros", 7, 9), (2, "zeros", 9, 8), (1, "circular", 8, 8),
                          (2, "circular", 8, 10)])
def test_operator_norm_is_top_singular_value_squared(stride: int, padding_mode: str, height: int,
                                                     width: int) -> None:
    d = make_dict(stride, padding_mode, k=5, n_atoms=4, channels=2, seed=7)
    mat = synthesis_matrix(d.weight.detach().numpy(), stride, height, width, padding_mode == "circular")
    expected = np.linalg.svd(mat, compute_uv=False)[0] ** 2  # σ_max² of the explicit matrix
    assert d.operator_norm(height, width, iters=2000, rtol=1e-9) == pytest.approx(expected, rel=1e-5)
    # The defaults (a fresh dictionary: no cached vector) are accurate too; power iteration with
    # the same budget was off by ~1e-3 here (nearly degenerate top eigenvalues).
    d2 = make_dict(stride, padding_mode, k=5, n_atoms=4, channels=2, seed=7)
    assert d2.operator_norm(height, width) == pytest.approx(expected, rel=1e-5)


def test_operator_norm_cache_follows_weight_changes() -> None:
    d = make_dict(1, k=5, n_atoms=4, channels=1)
    first = d.operator_norm(16, 16)
    assert d.operator_norm(16, 16) == first
    with torch.no_grad():
        d.weight.mul_(2.0)  # in-place update (as an optimiser step does): ‖Φ‖² scales by 4
    assert d.operator_norm(16, 16) == pytest.approx(4 * first, rel=1e-3)


def test_top_eigenvector_gives_the_operator_norm_and_its_gradient() -> None:
    """‖Φv‖² with the cached top eigenvector equals L, and its gradient is the gradient of L."""
    d = make_dict(2, k=5, n_atoms=4, channels=2, seed=3)
    lipschitz = d.operator_norm(12, 12, iters=2000, rtol=1e-10)
    v = d.top_eigenvector(12, 12)
    assert v.shape == (1, 4, 6, 6) and float(v.norm()) == pytest.approx(1.0, rel=1e-6)
    value = d.decode(v, size=(12, 12)).pow(2).sum()
    assert float(value) == pytest.approx(lipschitz, rel=1e-5)
    value.backward()
    step = 1e-3 * d.weight.grad / d.weight.grad.norm()
    with torch.no_grad():
        d.weight.sub_(step)  # a small step against the gradient lowers L by about ⟨grad, step⟩
    drop = lipschitz - d.operator_norm(12, 12, iters=2000, rtol=1e-10)
    assert drop == pytest.approx(float((d.weight.grad * step).sum()), rel=0.05)


def test_atoms_are_unit_norm_and_seeded() -> None:
    d = ConvDictionary(8, 3, 5, 2, seed=4)
    norms = d.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8))
    assert torch.equal(d.weight, ConvDictionary(8, 3, 5, 2, seed=4).weight)
    assert not torch.equal(d.weight, ConvDictionary(8, 3, 5, 2, seed=5).weight)
    assert d.weight.shape == (8, 3, 5, 5) and d.stride == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kernel_size": 4}, "kernel_size=4: must be odd"),
    ({"kernel_size": 0}, "kernel_size=0: must be an integer ≥ 1"),
    ({"n_atoms": 0}, "n_atoms=0: must be an integer ≥ 1"),
    ({"in_channels": 2.5}, "in_channels=2.5: must be an integer ≥ 1"),
    ({"stride": 0}, "stride=0: must be an integer ≥ 1"),
    ({"padding_mode": "reflect"}, "padding_mode=reflect: unknown value; known: zeros, circular"),
])
def test_constructor_errors(kwargs: dict, match: str) -> None:
    args = {"n_atoms": 4, "in_channels": 1, "kernel_size": 3, "stride": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ConvDictionary(**args)


def test_from_weights_normalises_and_validates() -> None:
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64) * 3.0
    d = ConvDictionary.from_weights(w, stride=2)
    torch.testing.assert_close(d.weight.detach().flatten(1).norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(d.weight.detach(), w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    assert d.weight.dtype == torch.float64 and d.stride == 2 and d.n_atoms == 5
    assert not torch.equal(w, d.weight.detach())  # the caller's tensor is not modified in place
    with pytest.raises(ValueError, match="4-D"):
        ConvDictionary.from_weights(torch.randn(5, 3, 3))
    with pytest.raises(ValueError, match="square"):
        ConvDictionary.from_weights(torch.randn(5, 1, 3, 5))
    with pytest.raises(ValueError, match="odd"):
        ConvDictionary.from_weights(torch.randn(5, 1, 4, 4))
    with pytest.raises(ValueError, match="finite"):
        ConvDictionary.from_weights(torch.full((2, 1, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="unit-norm"):
        ConvDictionary.from_weights(w, normalize=False)


def test_save_load_round_trip(tmp_path) -> None:
    d = ConvDictionary(6, 3, 5, 2, padding_mode="circular", seed=11)
    path = d.save(tmp_path / "sub" / "dict.pt", note="hello")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    e = ConvDictionary.load(path)
    assert torch.equal(e.weight, d.weight)
    assert (e.stride, e.padding_mode, e.kernel_size, e.in_channels, e.n_atoms) == (2, "circular", 5, 3, 6)
    assert e.fingerprint() == d.fingerprint()
    assert ConvDictionary(6, 3, 5, 1, padding_mode="circular", seed=11).fingerprint() != d.fingerprint()
    assert ConvDictionary(6, 3, 5, 2, padding_mode="circular", seed=12).fingerprint() != d.fingerprint()


def test_load_refuses_truncated_and_foreign_files(tmp_path) -> None:
    d = ConvDictionary(6, 3, 5, 2, seed=11)
    good = d.save(tmp_path / "dict.pt")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        ConvDictionary.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"x": 1}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt.*not a warplca\.dictionary"):
        ConvDictionary.load(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ConvDictionary.load(tmp_path / "missing.pt")
