"""Thresholds T_λ and the penalties P_λ whose proximal maps they are.

Each threshold is the exact proximal map of a penalty, ``T_λ(u) = argmin_a ½(a − u)² + P_λ(a)``,
so the energy ``½‖x − Φa‖² + Σ P_λ(a_i)`` the solver reports is what the dynamics minimise.

| name | T_λ(u)                                                  | P_λ(a)                                 |
|------|---------------------------------------------------------|----------------------------------------|
| hard | u·1[|u| > λ]                                             | (λ²/2)·1[a ≠ 0]   (ℓ0)                 |
| soft | sign(u)·max(|u| − λ, 0)                                  | λ|a|              (ℓ1)                 |
| cel0 | 0 if |u| ≤ θλ; sign(u)(|u| − θλ)/(1 − θ) if ≤ λ; u above | θλ|a| − θa²/2 if |a| ≤ λ; θλ²/2 above  |
| half | Xu et al. (2012) half thresholding, jump at |u| = λ      | μ|a|^{1/2},  μ = ½·(4λ/54^{1/3})^{3/2} |

``cel0`` is the firm threshold of the minimax-concave penalty with concavity θ ∈ (0, 1) (θ → 0:
hard-like, θ → 1: soft). For ``half`` λ is the threshold (the smallest active |u|) and μ follows from
Xu et al.'s jump point (54^{1/3}/4)·(2μ)^{2/3} = λ. ``nonneg=True`` adds the indicator of a ≥ 0 to
the penalty: its proximal map is T_λ(max(u, 0)).

A threshold is one subclass of :class:`Threshold`, registered under its name by the class statement
(``class Soft(Threshold, name="soft")``): it defines the signed map and the signed penalty, the base
class adds the non-negative variant, the per-sample sum and the checks of λ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from warplca.settings import path_of

__all__ = ["THRESHOLDS", "Threshold", "check_threshold", "count_active", "get_threshold", "threshold_class"]

#: name -> threshold class, filled by the class statements of the subclasses
_REGISTRY: dict[str, type[Threshold]] = {}


class _Names(Sequence[str]):
    """The registered threshold names, in registration order: a live, read-only view, so a threshold
    registered after import (a plugin, a test) is known wherever ``THRESHOLDS`` was imported."""

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


#: the names :func:`get_threshold` accepts (``hard``, ``soft``, ``cel0``, ``half`` and any registered later)
THRESHOLDS: Sequence[str] = _Names()


@dataclass(frozen=True)
class Threshold:
    """A threshold T_λ at level ``lam`` = λ ≥ 0 with its penalty P_λ; callable on states.

    ``nonneg`` restricts activations to a ≥ 0 (for every threshold, here in the base class); ``theta`` is
    the one shape parameter a threshold may use (θ ∈ (0, 1) of ``cel0``). A new threshold subclasses this
    class with a ``name`` and defines :meth:`signed_map` and :meth:`signed_penalty` (and :meth:`check` for
    its own parameter ranges); see ``docs/architecture.md``, "Extending warp-lca".
    """

    lam: float = 1.0
    nonneg: bool = False
    theta: float = 0.5

    #: the registered name (``lca.threshold`` in configs), set by the class statement
    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a threshold name must be an identifier, got {name!r}")
        known = _REGISTRY.get(name)
        if known is not None and path_of(known) != path_of(cls):  # re-importing the same class replaces it
            raise ValueError(f"threshold {name!r} is already registered by {path_of(known)}")
        cls.name = name
        _REGISTRY[name] = cls

    def __post_init__(self) -> None:
        if not self.name or _REGISTRY.get(self.name) is not type(self):
            raise TypeError(f"{type(self).__name__} is not a registered threshold; build one with "
                            f"get_threshold(name, …), name one of {tuple(THRESHOLDS)}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not (
                math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam (λ) must be a finite number ≥ 0, got {self.lam!r}")
        self.check()

    # -- what a threshold defines --------------------------------------------------------------
    def check(self) -> None:
        """Refuse parameters this threshold cannot use (ValueError); λ ≥ 0 is checked already."""

    def signed_map(self, u: Tensor) -> Tensor:
        """T_λ(u) of the signed threshold: the proximal map of :meth:`signed_penalty`."""
        raise NotImplementedError(f"{type(self).__name__} defines no signed_map")

    def signed_penalty(self, a: Tensor) -> Tensor:
        """Elementwise P_λ(a) of the signed threshold (same shape as ``a``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no signed_penalty")

    def signed_penalty_sum(self, a: Tensor, dims: tuple[int, ...]) -> Tensor:
        """Σ P_λ(a) over ``dims``; override where a cheaper form exists."""
        return self.signed_penalty(a).sum(dims)

    # -- shared by every threshold -------------------------------------------------------------
    @property
    def mu(self) -> float:
        """The penalty weight (``half``: the ℓ1/2 weight μ of the λ ↔ μ mapping); λ unless overridden."""
        return self.lam

    def __call__(self, u: Tensor) -> Tensor:
        """Activations a = T_λ(u) (T_λ(max(u, 0)) when ``nonneg``)."""
        return self.signed_map(F.relu(u) if self.nonneg else u)

    def penalty(self, a: Tensor) -> Tensor:
        """Elementwise penalty P_λ(a) (same shape as ``a``); +∞ for a < 0 when ``nonneg``."""
        p = self.signed_penalty(a)
        return torch.where(a < 0, torch.full_like(p, math.inf), p) if self.nonneg else p

    def penalty_sum(self, a: Tensor) -> Tensor:
        """Penalty summed over all but the first (batch) dimension."""
        dims = tuple(range(1, a.dim()))  # reduce in place of flatten(1): no copy for channels_last
        return self.penalty(a).sum(dims) if self.nonneg else self.signed_penalty_sum(a, dims)


class HardThreshold(Threshold, name="hard"):
    """ℓ0: u·1[|u| > λ], penalty (λ²/2)·1[a ≠ 0]."""

    def signed_map(self, u: Tensor) -> Tensor:
        return F.hardshrink(u, self.lam) if self.lam > 0 else u.clone()  # one fused kernel

    def signed_penalty(self, a: Tensor) -> Tensor:
        return (0.5 * self.lam * self.lam) * (a != 0).to(a.dtype)

    def signed_penalty_sum(self, a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return (0.5 * self.lam * self.lam) * count_active(a)  # cheaper than the elementwise map


class SoftThreshold(Threshold, name="soft"):
    """ℓ1: sign(u)·max(|u| − λ, 0), penalty λ|a|."""

    def signed_map(self, u: Tensor) -> Tensor:
        return F.softshrink(u, self.lam) if self.lam > 0 else u.clone()  # one fused kernel

    def signed_penalty(self, a: Tensor) -> Tensor:
        return self.lam * a.abs()

    def signed_penalty_sum(self, a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return self.lam * a.abs().sum(dims)


class Cel0Threshold(Threshold, name="cel0"):
    """Firm threshold of the minimax-concave (CEL0) penalty with concavity θ ∈ (0, 1)."""

    def check(self) -> None:
        if not 0.0 < self.theta < 1.0:
            raise ValueError(f"theta (θ) of the cel0 threshold must lie in (0, 1), got {self.theta!r}")

    def signed_map(self, u: Tensor) -> Tensor:
        return _firm(u, self.theta * self.lam, self.lam)

    def signed_penalty(self, a: Tensor) -> Tensor:
        lam, th, mag = self.lam, self.theta, a.abs()
        return torch.where(mag <= lam, th * lam * mag - 0.5 * th * mag * mag,
                           torch.full_like(mag, 0.5 * th * lam * lam))


class HalfThreshold(Threshold, name="half"):
    """ℓ1/2: Xu et al. (2012) half thresholding with its jump at |u| = λ, penalty μ|a|^{1/2}."""

    @property
    def mu(self) -> float:
        """ℓ1/2 penalty weight μ = ½·(4λ/54^{1/3})^{3/2} (the λ ↔ μ mapping)."""
        return 0.5 * (4.0 * self.lam / 54.0 ** (1.0 / 3.0)) ** 1.5

    def signed_map(self, u: Tensor) -> Tensor:
        return _half(u, self.lam, 2.0 * self.mu)

    def signed_penalty(self, a: Tensor) -> Tensor:
        return self.mu * a.abs().sqrt()


def count_active(a: Tensor) -> Tensor:
    """Non-zeros per sample (ℓ0 over all but the batch dimension), in ``a``'s floating dtype: summed
    ``|sign(a)|``, ~8× faster on CPU than ``count_nonzero``, exact below 2^24 entries (float32)."""
    if not torch.is_floating_point(a):
        return torch.count_nonzero(a, dim=tuple(range(1, a.dim())))
    return a.sign().abs_().sum(tuple(range(1, a.dim())))


def _firm(u: Tensor, low: float, high: float) -> Tensor:
    """Firm threshold (Gao & Bruce 1997) between ``low`` and ``high``."""
    mag = u.abs()
    shrunk = u.sign() * (mag - low).clamp_min(0) * (high / (high - low))
    return torch.where(mag > high, u, torch.where(mag > low, shrunk, torch.zeros_like(u)))


def _half(u: Tensor, jump: float, lam_xu: float) -> Tensor:
    """Xu et al. (2012) half thresholding for min (a − u)² + lam_xu·|a|^{1/2}."""
    mag = u.abs()
    active = mag > jump
    safe = torch.where(active, mag, torch.ones_like(mag))
    phi = torch.arccos(((lam_xu / 8.0) * (safe / 3.0).pow(-1.5)).clamp(-1.0, 1.0))
    val = (2.0 / 3.0) * u * (1.0 + torch.cos(2.0 * math.pi / 3.0 - (2.0 / 3.0) * phi))
    return torch.where(active, val, torch.zeros_like(u))


def threshold_class(name: str) -> type[Threshold]:
    """The class registered as ``name``; ValueError naming the known thresholds otherwise."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"threshold must be one of {tuple(THRESHOLDS)}, got {name!r}")
    return cls


def get_threshold(name: str = "hard", lam: float = 1.0, nonneg: bool = False,
                  theta: float = 0.5) -> Threshold:
    """Build the threshold registered as ``name`` (``hard``, ``soft``, ``cel0``, ``half``, …)."""
    return threshold_class(name)(lam=float(lam), nonneg=bool(nonneg), theta=float(theta))


def check_threshold(name: Any, lam: Any = 1.0, nonneg: Any = False, theta: Any = 0.5) -> str | None:
    """The problem with these threshold settings as one message (None: they build a threshold), for
    config validation that must fail before any work: an unknown name, λ < 0, a θ the threshold refuses."""
    try:
        get_threshold(name, lam, nonneg, theta)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None
