"""Losses for WARP-CNN state prediction: Laplacian-weighted squared error, MSE, L1 and the coding energy.

The Laplacian loss is the project's definition (the paper, arXiv 2410.18794, names a
"Laplacian-inspired" squared error with γ = 3 but gives no formula)::

    L_γ(û, u*) = Σ_i w_i (û_i − u*_i)² / Σ_i w_i,      w_i = exp(|u*_i| / (γ λ))

The weight (an inverse Laplace density of scale γλ) lets the rare large, active states count against
the near-zero mass that dominates a plain MSE. It depends on the target only, sums run over the batch,
γ → ∞ gives the MSE, and against overflow the largest weight is scaled to 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from warplca.lca.dictionary import ConvDictionary
from warplca.lca.thresholds import Threshold, count_active
from warplca.settings import Annotated, Checked, Doc, Gt, OneOf

__all__ = ["LOSSES", "LossSettings", "build_loss", "coding_energy", "l1_loss", "laplacian_loss",
           "laplacian_weights", "mse_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check(pred: Tensor, target: Tensor) -> None:
    """ValueError unless prediction and target have the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape "
                         f"{tuple(target.shape)}")


def laplacian_weights(target: Tensor, lam: float, gamma: float = 3.0) -> Tensor:
    """Weights w_i = exp(|u*_i|/(γλ)) up to a common factor (the largest is 1); no gradient.
    ``gamma = math.inf`` gives all-ones weights (the MSE limit)."""
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"the Laplacian loss needs λ > 0 (its scale is γλ), got lam={lam!r}; use loss=mse")
    if not gamma > 0:
        raise ValueError(f"gamma (γ) must be > 0 (or inf for the MSE limit), got {gamma!r}")
    t = target.detach().abs()
    if math.isinf(gamma):
        return torch.ones_like(t)
    z = t / (gamma * lam)
    return torch.exp(z - z.max())


def laplacian_loss(pred: Tensor, target: Tensor, lam: float, gamma: float = 3.0) -> Tensor:
    """Σ w (û − u*)² / Σ w with w = exp(|u*|/(γλ)) (the project's definition; see the module doc)."""
    _check(pred, target)
    w = laplacian_weights(target, lam, gamma).to(pred.dtype)
    return (w * (pred - target).square()).sum() / w.sum()


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every state entry."""
    _check(pred, target)
    return F.mse_loss(pred, target)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over every state entry."""
    _check(pred, target)
    return F.l1_loss(pred, target)


LOSSES = ("laplacian", "mse", "l1")


@dataclass(frozen=True)
class LossSettings(Checked):
    """The ``loss`` group: WARP-CNN's regression loss (conf/loss)."""

    name: Annotated[str, OneOf(LOSSES, "loss")] = "laplacian"
    gamma: Annotated[float | None, Gt(0), Doc("the Laplacian scale γ: weights exp(|u*|/(γλ))")] = 3.0


def build_loss(name: str, lam: float | None = None, gamma: float = 3.0) -> LossFn:
    """The loss ``name`` (``laplacian``, ``mse`` or ``l1``) as a callable ``loss(pred, target)``;
    ``lam`` (the LCA threshold λ) and ``gamma`` are for ``laplacian`` only."""
    if name == "laplacian":
        if lam is None:
            raise ValueError("the laplacian loss needs lam (the LCA threshold λ)")
        laplacian_weights(torch.zeros(1), float(lam), float(gamma))  # validate λ and γ now, not mid-training
        return functools.partial(laplacian_loss, lam=float(lam), gamma=float(gamma))  # picklable (ddp_spawn)
    if name in ("mse", "l1"):
        return mse_loss if name == "mse" else l1_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def coding_energy(x: Tensor, u: Tensor, dictionary: ConvDictionary, threshold: Threshold,
                  temperature: float = 0.1) -> Tensor:
    """Per-image LCA energy ½‖x − Φa‖² + Σ P_λ(a) of the codes a = T_λ(u) of states ``u``, with a gradient.

    The value is exactly the solver's energy, scoring a prediction by what the warm start is for. The
    hard threshold gets a straight-through gradient: a and the active count pass as u·σ((|u| − λ)/t) and
    Σ σ((|u| − λ)/t), t = ``temperature``·λ. Other thresholds are differentiated as they are. Computed in
    float32 with any enclosing autocast switched off, like the solver (bf16 would change the energy).
    """
    if u.shape[0] != x.shape[0]:
        raise ValueError(f"{u.shape[0]} state maps for {x.shape[0]} images")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _coding_energy(x.float(), u.float(), dictionary, threshold, temperature)


def _coding_energy(x: Tensor, u: Tensor, dictionary: ConvDictionary, threshold: Threshold,
                   temperature: float) -> Tensor:
    dims = tuple(range(1, u.dim()))
    exact = threshold(u)
    if threshold.name == "hard" and threshold.lam > 0:
        lam = threshold.lam
        v = F.relu(u) if threshold.nonneg else u
        gate = torch.sigmoid((v.abs() - lam) / (temperature * lam))
        smooth = v * gate
        a = smooth + (exact - smooth).detach()
        count = gate.sum(dims)
        penalty = (0.5 * lam * lam) * (count + (count_active(exact) - count).detach())
    else:
        a = exact
        penalty = threshold.penalty_sum(a)
    resid = x - dictionary.decode(a, size=(x.shape[-2], x.shape[-1]))
    return 0.5 * resid.square().sum(tuple(range(1, resid.dim()))) + penalty
