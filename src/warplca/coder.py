"""``SparseCoder``: dictionary + LCA settings + normalisation, coding [0, 1] images end to end.

Normalise, run LCA, undo the normalisation and clamp; :class:`warplca.WarpLCA` adds the warm start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from warplca.lca.continuation import Continuation, solve_continuation
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA, LCAResult

if TYPE_CHECKING:  # the data package imports Lightning; keep ``import warplca`` light
    from warplca.data.normalization import Normalization

__all__ = ["CodedImages", "SparseCoder", "solve_targets"]


@dataclass
class CodedImages:
    """The LCA result of a batch of [0, 1] images and its reconstruction on the pixel scale."""

    result: LCAResult
    pixels: Tensor


class SparseCoder(nn.Module):
    """LCA over ``dictionary`` with ``lca``'s settings (default ``LCA(dictionary)``; it must use that
    dictionary), in the space of ``normalization`` ([0, 1] pixels ↔ coded space; identity if None)."""

    def __init__(self, dictionary: ConvDictionary, lca: LCA | None = None,
                 normalization: Normalization | None = None) -> None:
        super().__init__()
        if not isinstance(dictionary, ConvDictionary):
            raise ValueError(f"dictionary must be a ConvDictionary, got {type(dictionary).__name__}")
        lca = LCA(dictionary) if lca is None else lca
        if not isinstance(lca, LCA):
            raise ValueError(f"lca must be an LCA solver, got {type(lca).__name__}")
        if lca.dictionary is not dictionary:
            raise ValueError("lca must be built on the same dictionary object: LCA(dictionary, ...)")
        if normalization is not None and normalization.channels != dictionary.in_channels:
            raise ValueError(f"normalization has {normalization.channels} channels, the dictionary "
                             f"{dictionary.in_channels}")
        self.dictionary = dictionary
        self.lca = lca
        self.normalization = normalization

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] images (B, C, H, W) → the normalised space the model codes in. Images outside [0, 1]
        are refused: coding them would silently give meaningless states and energies."""
        if isinstance(images, Tensor) and images.is_floating_point() and images.numel():
            lo, hi = torch.aminmax(images.detach())
            if bool(lo < -1e-6) or bool(hi > 1 + 1e-6):
                raise ValueError(f"preprocess expects images in [0, 1], got values in [{float(lo):.4g}, "
                                 f"{float(hi):.4g}] (uint8 pixels: divide by 255; normalised images: pass "
                                 f"them to the model directly)")
        return images if self.normalization is None else self.normalization.apply(images)

    def postprocess(self, recon: Tensor, images: Tensor | None = None) -> Tensor:
        """Reconstructions in the coded space → [0, 1] images (normalisation undone, clamped); ``images``,
        the coded [0, 1] images, let per-image normalisations restore what they kept outside the code."""
        out = recon if self.normalization is None else self.normalization.invert(recon, images)
        return out.clamp(0.0, 1.0)

    def check_input(self, x: Tensor) -> None:
        """ValueError for input of the wrong type, rank, channels, dtype, device, or with NaN/Inf."""
        self.lca._check_input(x, None)

    def initial_states(self, x: Tensor, grad: bool = False) -> Tensor | None:
        """u₀ for images ``x`` in the coded space: None (cold start) here; WARP-LCA predicts it."""
        return None

    def forward(self, x: Tensor, iters: int = 10, warm: bool = True, trace: bool = False,
                grad: bool = False) -> LCAResult:
        """LCA on ``x`` (coded space) for ``iters`` steps from :meth:`initial_states` (``warm``) or 0."""
        self.check_input(x)
        u0 = self.initial_states(x, grad=grad) if warm else None
        return self.lca(x, iters=iters, u0=u0, trace=trace, grad=grad)

    @torch.no_grad()
    def code(self, images: Tensor, iters: int | None = None, warm: bool = True,
             trace: bool = False) -> CodedImages:
        """[0, 1] images → normalise → LCA (``iters``, default the solver's) → [0, 1] reconstruction."""
        x = self.preprocess(images)
        res = self(x, iters=self.lca.iters if iters is None else iters, warm=warm, trace=trace)
        return CodedImages(result=res, pixels=self.postprocess(res.recon, images))

    def extra_repr(self) -> str:
        return f"lca={self.lca!r}, normalization={self.normalization!r}"


def solve_targets(coder: SparseCoder, images: Tensor, iters: int, continuation: Continuation | None = None,
                  batch_size: int = 128, warm: bool = False) -> tuple[Tensor, float, float]:
    """The target solver on [0, 1] images: states (n, K, H', W') after ``iters`` steps — cold LCA,
    λ-continuation when given, or the coder's warm start with ``warm=True`` — in float32 sub-batches,
    with the sums of the final energies and ℓ0."""
    energy = l0 = 0.0
    out = []
    with torch.autocast(device_type=images.device.type, enabled=False):  # targets are always float32
        for sub in images.split(batch_size):
            x = coder.preprocess(sub.to(torch.float32))
            if continuation is None:
                res = coder(x, iters=iters, warm=warm)
            else:
                res = solve_continuation(coder.lca, x, iters, continuation)
            out.append(res.u.contiguous())
            energy += float(res.energy.double().sum()) if res.energy is not None else math.nan
            l0 += float(torch.count_nonzero(res.a))
    return torch.cat(out), energy, l0
