"""Convolutional dictionary Φ: ``n_atoms`` unit-norm atoms of shape C×k×k on a stride-s code grid.

Synthesis ``Φa`` is the transposed convolution with "same" zero padding p = (k−1)//2, cropped to H×W;
analysis ``Φᵀr`` is its exact adjoint. ``padding_mode="circular"`` makes both periodic (as in sporco).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from warplca.lca.operator import Operator, code_size, make_operator
from warplca.serialization import load_checked, save_atomic
from warplca.settings import Annotated, Doc, Ge, Odd, checked

FORMAT = "warplca.dictionary"


class ConvDictionary(nn.Module):
    """A bank of ``n_atoms`` unit-norm atoms (K, C, k, k) with exact encode / decode operators.

    ``kernel_size`` k is odd; codes are ⌈H/s⌉ × ⌈W/s⌉ for ``stride`` s; ``padding_mode`` is ``zeros``
    or ``circular``; ``seed`` seeds the random Gaussian initialisation (normalised after it).
    """

    @checked
    def __init__(self, n_atoms: Annotated[int, Ge(1)] = 64, in_channels: Annotated[int, Ge(1)] = 3,
                 kernel_size: Annotated[int, Ge(1), Odd(), Doc("atoms are centred on their code")] = 9,
                 stride: Annotated[int, Ge(1), Doc("of the code grid")] = 2,
                 padding_mode: Literal["zeros", "circular"] = "zeros",
                 seed: Annotated[int | None, Ge(0), Doc("of the random initial atoms")] = 0) -> None:
        super().__init__()
        self.stride = stride
        self.padding_mode = padding_mode
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.weight = nn.Parameter(torch.randn(n_atoms, in_channels, kernel_size, kernel_size, generator=gen))
        self.normalize_()
        self._norm_cache: dict[tuple, tuple[float, Tensor]] = {}

    @property
    def n_atoms(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (K, ⌈H/s⌉, ⌈W/s⌉) of the codes of an H×W image."""
        return (self.n_atoms, code_size(height, self.stride), code_size(width, self.stride))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    @torch.no_grad()
    def normalize_(self) -> ConvDictionary:
        """Rescale every atom to unit ℓ2 norm, in place (zero atoms are re-drawn)."""
        w = self.weight
        norms = w.flatten(1).norm(dim=1)
        dead = norms < 1e-12
        if bool(dead.any()):
            w[dead] = torch.randn_like(w[dead])
            norms = w.flatten(1).norm(dim=1)
        w.div_(norms.view(-1, 1, 1, 1))
        return self

    def operator(self, height: int, width: int, backend: str = "polyphase") -> Operator:
        """Φ / Φᵀ for H×W images (see :mod:`warplca.lca.operator`)."""
        return make_operator(self.weight, self.stride, height, width, self.padding_mode, backend)

    def encode(self, x: Tensor) -> Tensor:
        """Analysis Φᵀx: images (B, C, H, W) → code-grid drive (B, K, H', W')."""
        op = self.operator(*x.shape[-2:])
        return op.from_grid(op.encode(op.pixels(x)))

    def decode(self, a: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Synthesis Φa: codes (B, K, H', W') → images (B, C, H, W) of ``size`` (default s·H' × s·W')."""
        height, width = size if size is not None else (a.shape[-2] * self.stride, a.shape[-1] * self.stride)
        if self.code_shape(height, width)[1:] != tuple(a.shape[-2:]):
            raise ValueError(f"codes of spatial shape {tuple(a.shape[-2:])} do not belong to "
                             f"{height}×{width} images with stride {self.stride}")
        op = self.operator(height, width)
        return op.image(op.decode(op.to_grid(a)))

    @torch.no_grad()
    def operator_norm(self, height: int = 64, width: int | None = None, iters: int = 300,
                      rtol: float = 1e-5) -> float:
        """L = ‖Φ‖²_op = largest eigenvalue of ΦᵀΦ on H×W images.

        Float64 restarted Lanczos (power iteration stalls on the nearly degenerate top eigenvalues),
        at most ``iters`` operator applications, stopping at a Ritz residual ≤ ``rtol``·L. Cached per
        weight version; the eigenvector warm-starts the next call (cheap during learning).
        """
        width = height if width is None else width
        w = self.weight
        key = (height, width, w.device, w.dtype)
        version = (w._version, w.data_ptr())
        cached = self._norm_cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        op = make_operator(w.detach().to(torch.float64), self.stride, height, width, self.padding_mode)
        prev = self._norm_cache.get(("vec",) + key)
        if prev is not None:
            v = prev[1].clone()
        else:
            gen = torch.Generator().manual_seed(1234)
            v = torch.randn((1, *self.code_shape(height, width)), generator=gen, dtype=torch.float64)
            v = v.to(w.device)
        value, v = _top_eigenpair(lambda t: op.encode(op.decode(t)), op.to_grid(v), max(1, iters), rtol)
        self._norm_cache[key] = (version, value)
        self._norm_cache[("vec",) + key] = (version, op.from_grid(v))
        return value

    def top_eigenvector(self, height: int = 64, width: int | None = None) -> Tensor:
        """Unit eigenvector v (1, K, H', W') of ΦᵀΦ for L on H×W images (no gradient; weight dtype):
        ``‖Φv‖²`` is a differentiable estimate of L (what a coherence penalty pushes on)."""
        width = height if width is None else width
        self.operator_norm(height, width)
        w = self.weight
        vec = self._norm_cache[("vec", height, width, w.device, w.dtype)][1]
        return (vec / vec.norm()).to(w.dtype)

    def fingerprint(self) -> str:
        """Short SHA-256 of the atoms and geometry: identifies the dictionary in caches and bundles."""
        h = hashlib.sha256()
        w = self.weight.detach().to("cpu", torch.float32).contiguous()
        h.update(w.numpy().tobytes())
        h.update(f"{self.stride}|{self.padding_mode}".encode())
        return h.hexdigest()[:16]

    def config(self) -> dict:
        """Constructor arguments that rebuild this geometry."""
        return {"n_atoms": self.n_atoms, "in_channels": self.in_channels, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding_mode": self.padding_mode}

    def to_payload(self) -> dict:
        """Config and atoms as plain objects (for :meth:`save` and bundles)."""
        return {"config": self.config(), "weight": self.weight.detach().cpu().clone()}

    @classmethod
    def from_payload(cls, payload: dict) -> ConvDictionary:
        """Rebuild from :meth:`to_payload`: the atoms are restored bit for bit (not re-normalised)."""
        config = payload["config"]
        return cls.from_weights(payload["weight"], stride=config["stride"],
                                padding_mode=config.get("padding_mode", "zeros"), normalize=False,
                                check_norm=False)

    def save(self, path: str | os.PathLike, **meta: object) -> Path:
        """Write the dictionary (atoms + geometry + ``meta``) atomically to ``path``."""
        return save_atomic({**self.to_payload(), "meta": meta}, path, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ConvDictionary:
        """Read a dictionary written by :meth:`save`; a foreign or truncated file raises ValueError."""
        return cls.from_payload(load_checked(path, FORMAT, map_location))

    @classmethod
    def from_weights(cls, weight: Tensor, stride: int = 1, padding_mode: str = "zeros",
                     normalize: bool = True, check_norm: bool = True) -> ConvDictionary:
        """Wrap given atoms (n_atoms, C, k, k), normalised to unit norm unless ``normalize=False``;
        then they must already be unit-norm (``check_norm=False`` skips the check, for loading)."""
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            raise ValueError("weight must be a 4-D tensor (n_atoms, C, k, k), got "
                             f"{getattr(weight, 'shape', type(weight))}")
        if weight.shape[-1] != weight.shape[-2]:
            raise ValueError(f"atoms must be square, got {tuple(weight.shape[-2:])}")
        if not torch.is_floating_point(weight) or not bool(torch.isfinite(weight).all()):
            raise ValueError("weight must be a finite floating-point tensor")
        n, c, k, _ = weight.shape
        d = cls(n_atoms=n, in_channels=c, kernel_size=k, stride=stride, padding_mode=padding_mode, seed=None)
        with torch.no_grad():
            d.weight = nn.Parameter(weight.detach().clone())
            if normalize:
                d.normalize_()
            elif check_norm and not torch.allclose(d.weight.flatten(1).norm(dim=1),
                                    torch.ones(n, dtype=weight.dtype, device=weight.device), atol=1e-4):
                raise ValueError("atoms are not unit-norm; pass normalize=True")
        return d


def _top_eigenpair(apply: Callable[[Tensor], Tensor], v: Tensor, max_apply: int, rtol: float,
                   max_basis: int = 64, budget_bytes: int = 256 * 2**20) -> tuple[float, Tensor]:
    """Largest eigenvalue and eigenvector of a symmetric PSD operator by restarted Lanczos.

    Fully re-orthogonalised basis of at most ``max_basis`` vectors (within ``budget_bytes``), restarted
    from the top Ritz vector when full. Stops at a Ritz residual ≤ ``rtol``·θ, on an invariant
    subspace, or after ``max_apply`` operator applications.
    """
    shape, n = v.shape, v.numel()
    m = int(max(2, min(max_basis, n, budget_bytes // max(1, n * v.element_size()))))
    q = torch.empty((m, n), dtype=v.dtype, device=v.device)
    y = v.flatten() / v.norm().clamp_min(1e-300)
    theta, applied = 0.0, 0
    while True:
        q[0] = y
        alphas: list[float] = []
        betas: list[float] = []
        for j in range(m):
            w = apply(q[j].view(shape)).flatten()
            applied += 1
            coef = q[: j + 1] @ w
            alphas.append(float(coef[j]))
            w = w - q[: j + 1].T @ coef
            w = w - q[: j + 1].T @ (q[: j + 1] @ w)  # second pass: orthogonal to working precision
            beta = float(w.norm())
            off = torch.tensor(betas, dtype=torch.float64)
            tri = torch.diag(off.new_tensor(alphas)) + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(tri)
            theta = float(evals[-1])
            resid = beta * abs(float(evecs[-1, -1]))
            done = (resid <= rtol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300)
                    or applied >= max_apply)
            if done or j == m - 1:
                break
            betas.append(beta)
            q[j + 1] = w / beta
        s = evecs[:, -1].to(device=q.device, dtype=q.dtype)
        y = q[: len(alphas)].T @ s
        y = y / y.norm().clamp_min(1e-300)
        if done:
            return theta, y.view(shape)


def random_dictionary_like(d: ConvDictionary, seed: int = 0) -> ConvDictionary:
    """A random unit-norm dictionary of the same geometry (a baseline for learned ones)."""
    out = ConvDictionary(d.n_atoms, d.in_channels, d.kernel_size, d.stride, d.padding_mode, seed=seed)
    return out.to(device=d.weight.device, dtype=d.weight.dtype)


def stable_tau(lipschitz: float) -> float:
    """Smallest τ with a guaranteed energy descent for the LCA step: τ = L (η = 1/L)."""
    return float(max(lipschitz, 1.0)) if math.isfinite(lipschitz) else math.inf
