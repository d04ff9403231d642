"""Convolutional dictionary Φ: ``n_atoms`` unit-norm atoms of shape C×k×k on a stride-s code grid.

Synthesis (decode) ``Φa`` is the transposed convolution with "same" zero padding p = (k−1)//2 and
the output padding that makes the image exactly H×W; analysis (encode) ``Φᵀr`` is the matching
strided convolution, its exact adjoint. ``padding_mode="circular"`` switches both to periodic
boundaries (what FFT-based solvers such as sporco use).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from warplca.lca.operator import Operator, code_size, make_operator
from warplca.serialization import load_checked, save_atomic

PADDING_MODES = ("zeros", "circular")
FORMAT = "warplca.dictionary"


class ConvDictionary(nn.Module):
    """A bank of unit-norm convolutional atoms with exact encode / decode operators.

    Args:
        n_atoms: number of atoms K.
        in_channels: image channels C.
        kernel_size: odd atom size k.
        stride: code-grid stride s ≥ 1 (codes are ⌈H/s⌉ × ⌈W/s⌉).
        padding_mode: ``zeros`` ("same" zero padding) or ``circular``.
        seed: seed of the random Gaussian initialisation (atoms are normalised after it).
    """

    def __init__(self, n_atoms: int = 64, in_channels: int = 3, kernel_size: int = 9, stride: int = 1,
                 padding_mode: str = "zeros", seed: int | None = 0) -> None:
        super().__init__()
        for name, value in (("n_atoms", n_atoms), ("in_channels", in_channels),
                            ("kernel_size", kernel_size), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (atoms are centred on their code position), "
                             f"got {kernel_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.stride = stride
        self.padding_mode = padding_mode
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        weight = torch.randn(n_atoms, in_channels, kernel_size, kernel_size, generator=gen)
        self.weight = nn.Parameter(weight)
        self.normalize_()
        self._norm_cache: dict[tuple, tuple[float, Tensor]] = {}

    # -- geometry -------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    @property
    def padding(self) -> int:
        return (self.kernel_size - 1) // 2

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (K, ⌈H/s⌉, ⌈W/s⌉) of the codes of an H×W image."""
        return (self.n_atoms, code_size(height, self.stride), code_size(width, self.stride))

    def extra_repr(self) -> str:
        return (f"n_atoms={self.n_atoms}, in_channels={self.in_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding_mode={self.padding_mode!r}")

    # -- atoms ----------------------------------------------------------------------------------
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
        return op.encode(op.pixels(x))

    def decode(self, a: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Synthesis Φa: codes (B, K, H', W') → images (B, C, H, W).

        ``size`` is the image size (H, W); by default H = s·H'. Pass it for sizes not divisible by s.
        """
        height, width = size if size is not None else (a.shape[-2] * self.stride, a.shape[-1] * self.stride)
        if self.code_shape(height, width)[1:] != tuple(a.shape[-2:]):
            raise ValueError(f"codes of spatial shape {tuple(a.shape[-2:])} do not belong to "
                             f"{height}×{width} images with stride {self.stride}")
        op = self.operator(height, width)
        return op.image(op.decode(a))

    # -- operator norm --------------------------------------------------------------------------
    @torch.no_grad()
    def operator_norm(self, height: int = 64, width: int | None = None, iters: int = 200,
                      rtol: float = 1e-5) -> float:
        """L = ‖Φ‖²_op = largest eigenvalue of ΦᵀΦ on H×W images, by power iteration.

        Warm-started from the previous call's eigenvector and cached per weight version, so
        re-checking a slowly changing dictionary (during learning) costs a few iterations.
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
        v /= v.norm()
        value = 0.0
        for _ in range(iters):
            nv = op.encode(op.decode(v))
            new_value = float(nv.norm())
            v = nv / max(new_value, 1e-300)
            if abs(new_value - value) <= rtol * new_value:
                value = new_value
                break
            value = new_value
        self._norm_cache[key] = (version, value)
        self._norm_cache[("vec",) + key] = (version, v)
        return value

    # -- identity and persistence ---------------------------------------------------------------
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
        return {"config": self.config(), "weight": self.weight.detach().cpu().clone()}

    @classmethod
    def from_payload(cls, payload: dict) -> ConvDictionary:
        return cls.from_weights(payload["weight"], stride=payload["config"]["stride"],
                                padding_mode=payload["config"].get("padding_mode", "zeros"))

    def save(self, path: str | os.PathLike, **meta: object) -> Path:
        """Write the dictionary (atoms + geometry + ``meta``) atomically to ``path``."""
        return save_atomic({**self.to_payload(), "meta": meta}, path, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ConvDictionary:
        """Read a dictionary written by :meth:`save`; a foreign or truncated file raises ValueError."""
        payload = load_checked(path, FORMAT, map_location)
        return cls.from_payload(payload)

    @classmethod
    def from_weights(cls, weight: Tensor, stride: int = 1, padding_mode: str = "zeros",
                     normalize: bool = True) -> ConvDictionary:
        """Wrap given atoms (n_atoms, C, k, k); they are normalised to unit norm unless told not to."""
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
            elif not torch.allclose(d.weight.flatten(1).norm(dim=1),
                                    torch.ones(n, dtype=weight.dtype, device=weight.device), atol=1e-4):
                raise ValueError("atoms are not unit-norm; pass normalize=True")
        return d


def random_dictionary_like(d: ConvDictionary, seed: int = 0) -> ConvDictionary:
    """A random unit-norm dictionary of the same geometry (a baseline for learned ones)."""
    out = ConvDictionary(d.n_atoms, d.in_channels, d.kernel_size, d.stride, d.padding_mode, seed=seed)
    return out.to(device=d.weight.device, dtype=d.weight.dtype)


def stable_tau(lipschitz: float) -> float:
    """Smallest τ with a guaranteed energy descent for the LCA step: τ = L (η = 1/L)."""
    return float(max(lipschitz, 1.0)) if math.isfinite(lipschitz) else math.inf
