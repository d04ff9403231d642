"""SparseCoder: normalise → LCA → undo the normalisation, end to end, for every normalisation."""

from __future__ import annotations

import pytest
import torch

from warplca import LCA, ConvDictionary, SparseCoder, WarpCNN, WarpLCA
from warplca.data.normalization import KINDS, Normalization


@pytest.mark.parametrize("kind", KINDS)
def test_code_reconstructs_on_the_pixel_scale(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g)
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    norm = Normalization(mean=(0.4, 0.5, 0.6), kind=kind)
    coder = SparseCoder(d, LCA(d, lam=0.1, tau="auto", iters=30), norm)
    coded = coder.code(images)
    x = norm.apply(images)
    reference = LCA(d, lam=0.1, tau="auto")(x, iters=30)
    assert torch.equal(coded.result.a, reference.a)
    assert torch.allclose(coded.pixels, norm.invert(reference.recon, images).clamp(0, 1), atol=1e-6)
    # with no active coefficient the reconstruction is exactly what the normalisation keeps outside
    empty = coder.postprocess(torch.zeros_like(x), images)
    assert torch.allclose(empty, norm.base(images).expand_as(images).clamp(0, 1), atol=1e-6)


def test_warp_lca_is_a_sparse_coder_whose_cold_run_ignores_the_predictor() -> None:
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    lca = LCA(d, lam=0.1, tau="auto")
    norm = Normalization(mean=(0.5, 0.5, 0.5), kind="image_mean")
    model = WarpLCA(d, WarpCNN(3, 8, stride=2), lca, norm)
    coder = SparseCoder(d, lca, norm)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert isinstance(model, SparseCoder)
    cold, plain = model.code(images, iters=20, warm=False), coder.code(images, iters=20)
    assert torch.equal(cold.result.u, plain.result.u) and torch.equal(cold.pixels, plain.pixels)
    with pytest.raises(ValueError, match="per image"):
        model.postprocess(cold.result.recon)  # image_mean needs the images to restore the means
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coder.code(images * 255)
