"""``WarpLCA``: dictionary + WARP-CNN predictor + LCA settings + normalisation, in one object and one file.

``model(x, iters)`` runs LCA from the predicted states u₀ = f_θ(x); ``model(x, iters, warm=False)`` is
cold LCA (u₀ = 0) with exactly the same solver, so warm/cold comparisons differ only in the start.

The start guard (on by default, also for older bundles) keeps WARP-LCA from starting above cold LCA's
energy E(0) = ½‖x‖²: where E(T_λ(û)) is higher, û is replaced by 0. It costs one synthesis Φa per start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from warplca.coder import SparseCoder
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA, image_norms
from warplca.lca.thresholds import count_active
from warplca.models.warp_cnn import WarpCNN
from warplca.serialization import load_checked, save_atomic

if TYPE_CHECKING:  # the data package imports Lightning; keep ``import warplca`` light
    from warplca.data.normalization import Normalization

__all__ = ["FORMAT", "WarmStart", "WarpLCA"]

FORMAT = "warplca.bundle"


@dataclass
class WarmStart:
    """The start WARP-LCA takes for a batch: ``states`` u₀ (B, K, H', W'), i.e. û with 0 for images the
    guard sent back; ``predicted`` û itself; (B,) ``guarded`` (E(T_λ(û)) > ½‖x‖²), ``energy`` E(T_λ(û))
    and ``cold_energy`` ½‖x‖², None when the guard is off."""

    states: Tensor
    predicted: Tensor
    guarded: Tensor | None = None
    energy: Tensor | None = None
    cold_energy: Tensor | None = None


class WarpLCA(SparseCoder):
    """WARP-LCA: LCA warm-started from a learned state prediction (a :class:`SparseCoder` + predictor).

    ``predictor`` is a :class:`WarpCNN` (or any module with ``in_channels``, ``n_atoms``, ``stride``,
    ``use_drive`` and ``forward(x, drive=None)``; only ``WarpCNN`` can be saved) fitting ``dictionary``;
    ``start_guard`` starts from 0 where the predicted start's energy exceeds ½‖x‖² (module docstring).
    """

    def __init__(self, dictionary: ConvDictionary, predictor: nn.Module, lca: LCA | None = None,
                 normalization: Normalization | None = None, start_guard: bool = True) -> None:
        super().__init__(dictionary, lca, normalization)
        if not isinstance(start_guard, bool):
            raise ValueError(f"start_guard must be True or False, got {start_guard!r}")
        expected = {"in_channels": dictionary.in_channels, "n_atoms": dictionary.n_atoms,
                    "stride": dictionary.stride}
        got = {k: getattr(predictor, k, None) for k in expected}
        if got != expected:
            raise ValueError(f"predictor does not fit the dictionary: expected {expected}, got {got}")
        self.predictor = predictor
        self.start_guard = start_guard
        self.meta: dict[str, Any] = {}

    def predict_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """The predictor's states û = f_θ(x) (B, K, ⌈H/s⌉, ⌈W/s⌉) for images ``x`` in the coded space."""
        self.check_input(x)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):  # no graph into the drive otherwise
            drive = self.dictionary.encode(x) if getattr(self.predictor, "use_drive", False) else None
            return self.predictor(x, drive)

    def guard(self, x: Tensor, u: Tensor) -> WarmStart:
        """The start guard on predicted states ``u`` for images ``x`` (coded space), whatever ``start_guard``.

        Per image, the solver's energy E(T_λ(u)) = ½‖x − Φ T_λ(u)‖² + Σ P_λ(T_λ(u)) is compared with
        E(0) = ½‖x‖²; where it is higher the state is replaced by 0. Predictions without any active
        coefficient are kept. Gradients flow through the kept states.
        """
        self.lca._check_codes(x, u.detach(), "u0")  # shape, dtype, NaN/Inf: as the solver would say
        with torch.no_grad():
            a = self.lca.states_to_codes(u.detach())
            energy = self.lca.energy(x.detach(), a)
            cold = 0.5 * image_norms(x.detach()).square()
            guarded = (count_active(a) > 0) & (energy > cold)
        states = torch.where(guarded.view(-1, *([1] * (u.dim() - 1))), torch.zeros_like(u), u)
        return WarmStart(states=states, predicted=u, guarded=guarded, energy=energy, cold_energy=cold)

    def warm_start(self, x: Tensor, grad: bool = False) -> WarmStart:
        """The predicted states û = f_θ(x) and, with ``start_guard``, the guarded start u₀."""
        u = self.predict_states(x, grad=grad)
        return self.guard(x, u) if self.start_guard else WarmStart(states=u, predicted=u)

    def initial_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """u₀: the warm start f_θ(x), with 0 for images the start guard sends back (if it is on)."""
        return self.warm_start(x, grad=grad).states

    def to_payload(self) -> dict[str, Any]:
        """Everything :meth:`load` needs, as plain objects and CPU tensors."""
        if not isinstance(self.predictor, WarpCNN):
            raise ValueError(f"only WarpCNN predictors can be saved, got {type(self.predictor).__name__}")
        state = {k: v.detach().cpu().clone() for k, v in self.predictor.state_dict().items()}
        return {
            "dictionary": self.dictionary.to_payload(),
            "predictor": {"config": self.predictor.config(), "state_dict": state},
            "lca": self.lca.settings(),
            "normalization": None if self.normalization is None else self.normalization.to_dict(),
            "start_guard": self.start_guard,
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
            model = cls(dictionary, predictor, lca, None if norm is None else Normalization.from_dict(norm),
                        start_guard=payload.get("start_guard", True))  # older bundles: guard on
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: inconsistent {FORMAT} artifact: {exc}") from exc
        model.meta = dict(payload.get("meta") or {})
        return model.to(map_location)

