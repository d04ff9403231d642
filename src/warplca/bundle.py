"""``WarpLCA``: dictionary + WARP-CNN predictor + LCA settings + normalisation, in one object and one file.

``model(x, iters)`` runs WARP-LCA: the predictor guesses the LCA internal states u₀ = f_θ(x) and
LCA runs its ordinary iterations from there. ``model(x, iters, warm=False)`` is cold LCA (u₀ = 0)
with exactly the same dictionary, threshold, λ, τ and operator, so warm/cold comparisons differ
only in the start. ``save``/``load`` write and read everything needed for that in one atomic,
self-describing artifact.

The start guard (``start_guard=True``, the default, also for bundles written before the option existed):
WARP-LCA never starts above cold LCA's starting energy E(0) = ½‖x‖². Per image, the energy of the
predicted start E(T_λ(û)) = ½‖x − Φ T_λ(û)‖² + Σ P_λ(T_λ(û)) is compared with E(0), and û is replaced
by 0 (the cold start) where it is higher. It costs one synthesis Φa (half the convolutions of an LCA
iteration) plus the threshold and the penalty per start; the convergence evaluation reports its time
(``start_guard_ms_per_image``) and how often it fires. :meth:`WarpLCA.warm_start` says which images it
sent back.
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
from warplca.lca.solver import LCA
from warplca.models.warp_cnn import WarpCNN
from warplca.serialization import load_checked, save_atomic

if TYPE_CHECKING:  # the data package imports Lightning; keep ``import warplca`` light
    from warplca.data.normalization import Normalization

__all__ = ["FORMAT", "WarmStart", "WarpLCA"]

FORMAT = "warplca.bundle"


@dataclass
class WarmStart:
    """The start WARP-LCA takes for a batch (see :meth:`WarpLCA.warm_start`).

    Attributes:
        states: u₀ (B, K, H', W'): the prediction û, with 0 for the images the guard sent back.
        predicted: the predictor's û itself.
        guarded: (B,) bool, True where E(T_λ(û)) > ½‖x‖² and u₀ = 0; None when the guard is off.
        energy: (B,) energy of the predicted start E(T_λ(û)); None when the guard is off.
        cold_energy: (B,) energy of the cold start E(0) = ½‖x‖²; None when the guard is off.
    """

    states: Tensor
    predicted: Tensor
    guarded: Tensor | None = None
    energy: Tensor | None = None
    cold_energy: Tensor | None = None


class WarpLCA(SparseCoder):
    """WARP-LCA: LCA warm-started from a learned state prediction (a :class:`SparseCoder` + predictor).

    Args:
        dictionary: the fixed atoms Φ the predictor was trained for.
        predictor: a :class:`WarpCNN` (or any module with ``in_channels``, ``n_atoms``, ``stride``,
            ``use_drive`` and ``forward(x, drive=None)``; only ``WarpCNN`` can be saved).
        lca: the solver; it must use ``dictionary``. Default: ``LCA(dictionary)``.
        normalization: [0, 1] pixels ↔ coded space (``preprocess``/``postprocess``); identity if None.
        start_guard: start from 0 instead of û for images whose predicted start energy exceeds cold
            LCA's ½‖x‖² (module docstring). Saved in the bundle; on by default.
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
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            drive = None
            if getattr(self.predictor, "use_drive", False):
                drive = self.dictionary.encode(x) if grad else self.dictionary.encode(x).detach()
            return self.predictor(x, drive)

    def guard(self, x: Tensor, u: Tensor) -> WarmStart:
        """The start guard on predicted states ``u`` for images ``x`` (coded space), whatever ``start_guard``.

        Per image, E(T_λ(u)) = ½‖x − Φ T_λ(u)‖² + Σ P_λ(T_λ(u)) (the solver's energy, computed on its own
        operator) is compared with the cold start's E(0) = ½‖x‖²; where it is higher the state is replaced
        by 0. A prediction without any active coefficient has E(0) exactly and is kept. Gradients flow
        through the kept states.
        """
        self.lca._check_codes(x, u.detach(), "u0")  # shape, dtype, NaN/Inf: as the solver would say
        with torch.no_grad():
            xd, ud = x.detach(), u.detach()
            op = self.dictionary.operator(xd.shape[-2], xd.shape[-1], self.lca.backend)
            xt = op.pixels(xd)
            a = self.lca.states_to_codes(ud)
            dims = tuple(range(1, xt.dim()))
            resid = xt - op.decode(op.to_grid(a))
            penalty = self.lca.threshold.penalty_sum(a)
            energy = 0.5 * torch.linalg.vector_norm(resid, dim=dims).square() + penalty
            cold = 0.5 * torch.linalg.vector_norm(xt, dim=dims).square()
            active = torch.count_nonzero(a.reshape(a.shape[0], -1), dim=1) > 0
            guarded = active & (energy > cold)
        states = torch.where(guarded.view(-1, *([1] * (u.dim() - 1))), torch.zeros_like(u), u)
        return WarmStart(states=states, predicted=u, guarded=guarded, energy=energy, cold_energy=cold)

    def warm_start(self, x: Tensor, grad: bool = False) -> WarmStart:
        """The predicted states û = f_θ(x) and, with ``start_guard``, the guarded start u₀."""
        u = self.predict_states(x, grad=grad)
        if not self.start_guard:
            return WarmStart(states=u, predicted=u)
        return self.guard(x, u)

    def initial_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """u₀: the warm start f_θ(x), with 0 for images the start guard sends back (if it is on)."""
        return self.warm_start(x, grad=grad).states

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
            normalization = None if norm is None else Normalization.from_dict(norm)
            start_guard = payload.get("start_guard", True)  # bundles older than the option: on
            model = cls(dictionary, predictor, lca, normalization, start_guard=start_guard)
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: inconsistent {FORMAT} artifact: {exc}") from exc
        model.meta = dict(payload.get("meta") or {})
        return model.to(map_location)

