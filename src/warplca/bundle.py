"""``WarpLCA``: dictionary + WARP-CNN predictor + LCA settings + normalisation, in one object and one file.

``model(x, iters)`` runs WARP-LCA: the predictor guesses the LCA internal states u₀ = f_θ(x) and
LCA runs its ordinary iterations from there. ``model(x, iters, warm=False)`` is cold LCA (u₀ = 0)
with exactly the same dictionary, threshold, λ, τ and operator, so warm/cold comparisons differ
only in the start. ``save``/``load`` write and read everything needed for that in one atomic,
self-describing artifact (DESIGN §3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA, LCAResult
from warplca.models.warp_cnn import WarpCNN
from warplca.serialization import load_checked, save_atomic

if TYPE_CHECKING:  # the data package imports Lightning; keep ``import warplca`` light
    from warplca.data.normalization import Normalization

__all__ = ["FORMAT", "WarpLCA"]

FORMAT = "warplca.bundle"


class WarpLCA(nn.Module):
    """WARP-LCA: LCA warm-started from a learned state prediction.

    Args:
        dictionary: the fixed atoms Φ the predictor was trained for.
        predictor: a :class:`WarpCNN` (or any module with ``in_channels``, ``n_atoms``, ``stride``,
            ``use_drive`` and ``forward(x, drive=None)``; only ``WarpCNN`` can be saved).
        lca: the solver; it must use ``dictionary``. Default: ``LCA(dictionary)``.
        normalization: [0, 1] pixels ↔ coded space (``preprocess``/``postprocess``); identity if None.
    """

    def __init__(self, dictionary: ConvDictionary, predictor: nn.Module, lca: LCA | None = None,
                 normalization: Normalization | None = None) -> None:
        super().__init__()
        if not isinstance(dictionary, ConvDictionary):
            raise ValueError(f"dictionary must be a ConvDictionary, got {type(dictionary).__name__}")
        lca = LCA(dictionary) if lca is None else lca
        if not isinstance(lca, LCA):
            raise ValueError(f"lca must be an LCA solver, got {type(lca).__name__}")
        if lca.dictionary is not dictionary:
            raise ValueError("lca must be built on the same dictionary object: LCA(dictionary, ...)")
        expected = {"in_channels": dictionary.in_channels, "n_atoms": dictionary.n_atoms,
                    "stride": dictionary.stride}
        got = {k: getattr(predictor, k, None) for k in expected}
        if got != expected:
            raise ValueError(f"predictor does not fit the dictionary: expected {expected}, got {got}")
        if normalization is not None and normalization.channels != dictionary.in_channels:
            raise ValueError(f"normalization has {normalization.channels} channels, the dictionary "
                             f"{dictionary.in_channels}")
        self.dictionary = dictionary
        self.predictor = predictor
        self.lca = lca
        self.normalization = normalization
        self.meta: dict[str, Any] = {}

    # -- pixels <-> coded space -----------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] images (B, C, H, W) → the normalised space the model codes in.

        Images outside [0, 1] (e.g. 0–255 pixels, or already normalised ones) are refused: coding them
        would silently give meaningless states and energies.
        """
        if isinstance(images, Tensor) and images.is_floating_point() and images.numel():
            lo, hi = torch.aminmax(images.detach())
            if bool(lo < -1e-6) or bool(hi > 1 + 1e-6):
                raise ValueError(f"preprocess expects images in [0, 1], got values in [{float(lo):.4g}, "
                                 f"{float(hi):.4g}] (uint8 pixels: divide by 255; normalised images: pass "
                                 f"them to the model directly)")
        return images if self.normalization is None else self.normalization.apply(images)

    def postprocess(self, recon: Tensor) -> Tensor:
        """Reconstructions in the coded space → [0, 1] images (normalisation undone, clamped)."""
        out = recon if self.normalization is None else self.normalization.invert(recon)
        return out.clamp(0.0, 1.0)

    # -- inference ------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """ValueError for input of the wrong type, rank, channels, dtype, device, or with NaN/Inf."""
        self.lca._check_input(x, None)

    def predict_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """The predictor's states û = f_θ(x) (B, K, ⌈H/s⌉, ⌈W/s⌉) for images ``x`` in the coded space."""
        self.check_input(x)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            drive = None
            if getattr(self.predictor, "use_drive", False):
                drive = self.dictionary.encode(x) if grad else self.dictionary.encode(x).detach()
            return self.predictor(x, drive)

    def forward(self, x: Tensor, iters: int = 10, warm: bool = True, trace: bool = False,
                grad: bool = False) -> LCAResult:
        """LCA on ``x`` (coded space) for ``iters`` steps from u₀ = f_θ(x) (warm) or u₀ = 0 (cold)."""
        self.check_input(x)
        u0 = self.predict_states(x, grad=grad) if warm else None
        return self.lca(x, iters=iters, u0=u0, trace=trace, grad=grad)

    # -- persistence ----------------------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        if not isinstance(self.predictor, WarpCNN):
            raise ValueError(f"only WarpCNN predictors can be saved, got {type(self.predictor).__name__}")
        state = {k: v.detach().cpu().clone() for k, v in self.predictor.state_dict().items()}
        return {
            "dictionary": self.dictionary.to_payload(),
            "predictor": {"config": self.predictor.config(), "state_dict": state},
            "lca": self.lca.settings(),
            "normalization": None if self.normalization is None else self.normalization.to_dict(),
        }

    def save(self, path: str | os.PathLike, **meta: Any) -> Path:
        """Write the bundle (and plain-Python ``meta``) atomically to one file."""
        return save_atomic({**self.to_payload(), "meta": meta}, path, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> WarpLCA:
        """Read a bundle written by :meth:`save`; foreign, truncated or inconsistent files: ValueError."""
        from warplca.data.normalization import Normalization

        payload = load_checked(path, FORMAT, map_location)
        try:
            dictionary = ConvDictionary.from_payload(payload["dictionary"])
            predictor = WarpCNN(**payload["predictor"]["config"])
            predictor.load_state_dict(payload["predictor"]["state_dict"])
            lca = LCA(dictionary, **payload["lca"])
            norm = payload.get("normalization")
            normalization = None if norm is None else Normalization.from_dict(norm)
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: inconsistent {FORMAT} artifact: {exc}") from exc
        model = cls(dictionary, predictor, lca, normalization)
        model.meta = dict(payload.get("meta") or {})
        return model.to(map_location)

    def extra_repr(self) -> str:
        return f"lca={self.lca!r}, normalization={self.normalization!r}"
