"""Fast synthesis Φ and analysis Φᵀ for one image size, as two stride-1 ``conv2d`` calls.

A stride-s convolution with a k×k kernel equals a stride-1 convolution on the space-to-depth
(``pixel_unshuffle``) image with a ⌈k/s⌉×⌈k/s⌉ kernel of C·s² input channels (the polyphase form);
its adjoint is an ordinary ``conv2d`` with the flipped kernel followed by ``pixel_shuffle``. Plain
``conv2d`` is the most optimised kernel on every backend; ``conv_transpose2d`` dominates a naive LCA step.

The solver keeps pixels in the space-to-depth domain (``pixels`` / ``image``), entries outside the
image masked to zero so ‖x − Φa‖ = ‖X̃ − Φ̃a‖, and codes on the operator's grid (``to_grid`` /
``from_grid``): the code grid, or for thin convolutions 2×2 interleaved grids (:func:`auto_interleave`).

Operators (exact adjoint pairs, checked against explicit matrices in the tests): ``PolyphaseOperator``
(zero padding) and ``CircularPolyphaseOperator`` (periodic, H and W multiples of the block) are the fast
ones; ``DirectOperator`` (``conv_transpose2d`` / ``conv2d``) and ``CircularOperator`` (periodic, any size,
matching FFT-based solvers such as sporco) the textbook ones. :func:`make_operator` chooses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_layout(weight: Tensor) -> torch.memory_format:
    """Memory layout for the solver's tensors: NHWC where oneDNN / cuDNN have fast kernels for it,
    NCHW for CPU float64, whose only NHWC convolution is a slow reference path (~15× slower)."""
    if weight.device.type == "cpu" and weight.dtype == torch.float64:
        return torch.contiguous_format
    return torch.channels_last


def code_size(size: int, stride: int) -> int:
    """Code-grid length ⌈size / stride⌉."""
    return -(-size // stride)


class DirectOperator:
    """Φ and Φᵀ with zero ("same") padding via ``conv_transpose2d`` and ``conv2d``."""

    layout = torch.contiguous_format

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        self.weight, self.stride, self.height, self.width = weight, stride, height, width
        self.pad = (weight.shape[-1] - 1) // 2
        hc, wc = code_size(height, stride), code_size(width, stride)
        self.code_shape = self.grid_shape = (weight.shape[0], hc, wc)
        self.out_pad = (height - 1 - (hc - 1) * stride, width - 1 - (wc - 1) * stride)

    def to_grid(self, a: Tensor) -> Tensor:
        """Identity: codes, pixels and their grids are the plain tensors here."""
        return a

    from_grid = pixels = image = to_grid

    def decode(self, a: Tensor) -> Tensor:
        return F.conv_transpose2d(a, self.weight, stride=self.stride, padding=self.pad,
                                  output_padding=self.out_pad)

    def encode(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self.weight, stride=self.stride, padding=self.pad)


class CircularOperator(DirectOperator):
    """Φ and Φᵀ with periodic boundaries (the atom centred on its code position)."""

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        super().__init__(weight, stride, height, width)
        if self.pad > min(height, width):
            raise ValueError(f"circular padding needs images of at least {self.pad} pixels, "
                             f"got {height}×{width}")

    def encode(self, r: Tensor) -> Tensor:
        p = self.pad
        out = F.conv2d(F.pad(r, (p, p, p, p), mode="circular"), self.weight, stride=self.stride)
        return out[..., : self.code_shape[1], : self.code_shape[2]]

    def decode(self, a: Tensor) -> Tensor:
        full = F.conv_transpose2d(a, self.weight, stride=self.stride)
        # Fold the periodic extension back onto the image (the adjoint of circular padding).
        return _fold(_fold(full, self.pad, self.height, -2), self.pad, self.width, -1)


def _fold(t: Tensor, p: int, n: int, dim: int) -> Tensor:
    """Sum entries of ``t`` along ``dim`` into n bins: index i lands in (i − p) mod n."""
    shape = list(t.shape)
    shape[dim] = n
    idx = (torch.arange(t.shape[dim], device=t.device) - p) % n
    return t.new_zeros(shape).index_add_(dim % t.dim(), idx, t)


def _interleaved(weight: Tensor, stride: int, r: int) -> Tensor:
    """Atoms for the stride-s code grid read as r×r interleaved grids of stride s·r: code (r·I + dy,
    r·J + dx) of atom m becomes code (I, J) of atom (m, dy, dx), Φ_m shifted by (s·dy, s·dx) in a
    support of k + s·(r − 1) pixels (channel order of ``pixel_unshuffle(codes, r)``)."""
    if r == 1:
        return weight
    n_atoms, channels, k, _ = weight.shape
    size = k + stride * (r - 1)
    shifted = [F.pad(weight, (stride * dx, size - k - stride * dx, stride * dy, size - k - stride * dy))
               for dy in range(r) for dx in range(r)]
    return torch.stack(shifted, dim=1).reshape(n_atoms * r * r, channels, size, size)


def auto_interleave(weight: Tensor, stride: int) -> int:
    """Interleave factor r for the polyphase operators: 2 on CPU at stride 1 with C ≤ 4, else 1 (none).

    CPU convolutions with 1–4 output channels are slow; 2×2 interleaved grids give 4× the channels for
    ((k+1)/k)² the multiply-adds (measured: 1.15–2.2× faster decode + encode, batch 64, 32×32). Strided
    dictionaries gained nothing (or lost up to 20 %); CUDA was not measured.
    """
    if weight.device.type == "cpu" and stride == 1 and weight.shape[1] <= 4:
        return 2
    return 1


class PolyphaseOperator:
    """Φ and Φᵀ with zero ("same") padding as stride-1 ``conv2d`` in the space-to-depth domain.

    ``interleave`` r: the operator's code grid is ``pixel_unshuffle(codes, r)``; ⌈H/s⌉ and ⌈W/s⌉ must
    be multiples of r. ``transposed_decode``: decode with ``conv_transpose2d`` (the same sums); default
    on CPU float64, whose NCHW ``conv2d`` with few output channels is ~30× slower.
    """

    def __init__(self, weight: Tensor, stride: int, height: int, width: int, interleave: int = 1,
                 transposed_decode: bool | None = None) -> None:
        n_atoms, channels, k, _ = weight.shape
        r = interleave
        self.stride, self.interleave, self.height, self.width = stride, r, height, width
        self.block = s = stride * r
        self.pad = p = (k - 1) // 2
        self.code_shape = (n_atoms, code_size(height, stride), code_size(width, stride))
        if self.code_shape[1] % r or self.code_shape[2] % r:
            raise ValueError(f"interleave {r} needs code grids divisible by it, got {self.code_shape[1:]}")
        hc, wc = self.code_shape[1] // r, self.code_shape[2] // r
        self.grid_shape = (n_atoms * r * r, hc, wc)
        kq = self._kernels(weight, transposed_decode)
        # Space-to-depth rows/cols that hold image pixels: [lo, hi] inclusive.
        r_lo, r_hi = self.rows = (p // s, (p + height - 1) // s)
        c_lo, c_hi = self.cols = (p // s, (p + width - 1) // s)
        self.dec_pad = (kq - 1 - c_lo, c_hi - (wc - 1), kq - 1 - r_lo, r_hi - (hc - 1))
        self.enc_pad = (c_lo, max(0, wc + kq - 2 - c_hi), r_lo, max(0, hc + kq - 2 - r_hi))
        self.img_pad = (p - s * c_lo, s * (c_hi + 1) - p - width, p - s * r_lo, s * (r_hi + 1) - p - height)
        self.mask = self._mask(weight, channels)

    def _kernels(self, weight: Tensor, transposed_decode: bool | None) -> int:
        """Set the layout and the encode kernel on the space-to-depth grid of block S,
        W[m, c·S² + ry·S + rx, qy, qx] = Φ[m, c, S·qy + ry, S·qx + rx] (zero past the atom), and its
        flipped transpose for decoding; returns the kernel size ⌈k/S⌉."""
        weight, s = _interleaved(weight, self.stride, self.interleave), self.block
        n_atoms, channels, k, _ = weight.shape
        self.kq = kq = math.ceil(k / s)
        w_enc = F.pad(weight, (0, kq * s - k, 0, kq * s - k)).reshape(n_atoms, channels, kq, s, kq, s)
        w_enc = w_enc.permute(0, 1, 3, 5, 2, 4).reshape(n_atoms, channels * s * s, kq, kq)
        self.layout = fmt = conv_layout(weight)
        self.transposed = fmt == torch.contiguous_format if transposed_decode is None else transposed_decode
        self.w_enc = w_enc.contiguous(memory_format=fmt)
        self.w_dec = w_enc.transpose(0, 1).flip(2, 3).contiguous(memory_format=fmt)
        return self.kq

    def _mask(self, weight: Tensor, channels: int) -> Tensor | None:
        """0/1 mask of the space-to-depth entries inside the image; None when all are (index arithmetic on
        the CPU: no device sync per operator)."""
        s, p = self.block, self.pad

        def valid(lo: int, hi: int, n: int) -> Tensor:
            pos = s * torch.arange(lo, hi + 1)[None, :] + torch.arange(s)[:, None]
            return (pos >= p) & (pos < p + n)  # (s, count)

        rv = valid(*self.rows, self.height)
        cv = valid(*self.cols, self.width)
        if bool(rv.all()) and bool(cv.all()):
            return None
        m = rv[:, None, :, None] & cv[None, :, None, :]  # (ry, rx, r, c)
        m = m.reshape(1, 1, s * s, *m.shape[-2:]).expand(1, channels, s * s, *m.shape[-2:])
        m = m.reshape(1, channels * s * s, *m.shape[-2:]).to(weight.device, weight.dtype)
        return m.contiguous(memory_format=self.layout)

    def to_grid(self, a: Tensor) -> Tensor:
        """Codes (B, K, H', W') → the operator's code grid (B, K·r², H'/r, W'/r)."""
        if self.interleave == 1:
            return a
        return F.pixel_unshuffle(a, self.interleave).contiguous(memory_format=self.layout)

    def from_grid(self, g: Tensor) -> Tensor:
        """The operator's code grid → codes (B, K, H', W')."""
        return g if self.interleave == 1 else F.pixel_shuffle(g, self.interleave)

    def pixels(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) → masked space-to-depth tensor X̃."""
        xt = F.pixel_unshuffle(F.pad(x, self.img_pad), self.block)
        return xt.contiguous(memory_format=self.layout)

    def image(self, xt: Tensor) -> Tensor:
        """Space-to-depth tensor → image (B, C, H, W)."""
        full = F.pixel_shuffle(xt, self.block)
        left, _, top, _ = self.img_pad
        return full[..., top : top + self.height, left : left + self.width]

    def decode(self, a: Tensor) -> Tensor:
        """Code grid → reconstruction Φa in the space-to-depth domain."""
        if self.transposed:
            full = F.conv_transpose2d(a, self.w_enc)  # every block the atoms reach
            (r_lo, r_hi), (c_lo, c_hi) = self.rows, self.cols
            out = F.pad(full, (-c_lo, c_hi + 1 - full.shape[-1], -r_lo, r_hi + 1 - full.shape[-2]))
        else:
            out = _conv_padded(a, self.w_dec, self.dec_pad)
        return out if self.mask is None else out.mul_(self.mask)

    def encode(self, xt: Tensor) -> Tensor:
        """Space-to-depth pixels → analysis Φᵀr on the code grid."""
        out = _conv_padded(xt, self.w_enc, self.enc_pad)
        return out[..., : self.grid_shape[1], : self.grid_shape[2]]


class CircularPolyphaseOperator(PolyphaseOperator):
    """Periodic Φ and Φᵀ as stride-1 ``conv2d`` on the space-to-depth grid (H, W multiples of s·r).

    With period H = s·H', wrapping the image is wrapping the code grid: one ``conv2d`` plus a circular
    pad (encode) or fold (decode) of the few pixel channels. Pixels are the space-to-depth image rolled
    by p = (k−1)/2 (a permutation: norms are unchanged).
    """

    def __init__(self, weight: Tensor, stride: int, height: int, width: int, interleave: int = 1,
                 transposed_decode: bool | None = None) -> None:
        n_atoms, k, r = weight.shape[0], weight.shape[-1], interleave
        self.stride, self.interleave, self.height, self.width = stride, r, height, width
        self.block = s = stride * r
        self.pad = (k - 1) // 2
        if height % s or width % s:
            raise ValueError(f"the circular polyphase operator needs H, W divisible by {s} "
                             f"(stride {stride} × interleave {r}), got {height}×{width}")
        self.code_shape = (n_atoms, height // stride, width // stride)
        self.grid_shape = (n_atoms * r * r, height // s, width // s)
        if self._kernels(weight, transposed_decode) - 1 > min(self.grid_shape[1:]):
            raise ValueError(f"atoms of size {k} wrap more than once around {height}×{width} images")
        self.mask = None

    def pixels(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) → space-to-depth tensor of the image rolled by p."""
        rolled = torch.roll(x, shifts=(self.pad, self.pad), dims=(-2, -1))
        return F.pixel_unshuffle(rolled, self.block).contiguous(memory_format=self.layout)

    def image(self, xt: Tensor) -> Tensor:
        return torch.roll(F.pixel_shuffle(xt, self.block), shifts=(-self.pad, -self.pad), dims=(-2, -1))

    def decode(self, a: Tensor) -> Tensor:
        # The full (zero-padded) synthesis, its overhang folded back periodically: the fold works
        # on the few pixel channels, where wrapping the input would copy all the codes.
        q = self.kq - 1
        full = F.conv_transpose2d(a, self.w_enc) if self.transposed else F.conv2d(a, self.w_dec, padding=q)
        hc, wc = self.grid_shape[1:]
        rows = full[..., :hc, :].clone(memory_format=self.layout)
        rows[..., :q, :] += full[..., hc:, :]
        out = rows[..., :wc].clone(memory_format=self.layout)
        out[..., :q] += rows[..., wc:]
        return out

    def encode(self, xt: Tensor) -> Tensor:
        return F.conv2d(_wrap(xt, self.kq - 1, self.layout), self.w_enc)


def _wrap(t: Tensor, q: int, layout: torch.memory_format) -> Tensor:
    """Circular padding by q ≤ size on the right and bottom, in the given layout.

    Block copies into a preallocated tensor: ``F.pad(mode="circular")`` returns NCHW and its copies
    of NHWC inputs are strided (~10× slower than this for the solver's code tensors).
    """
    if not q:
        return t
    h, w = t.shape[-2:]
    out = torch.empty((*t.shape[:-2], h + q, w + q), dtype=t.dtype, device=t.device, memory_format=layout)
    out[..., :h, :w] = t
    out[..., :h, w:] = t[..., :q]
    out[..., h:, :] = out[..., :q, :]
    return out


def _conv_padded(x: Tensor, weight: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """``conv2d(F.pad(x, pad), weight)`` without materialising the padded input.

    Negative pads crop the input; unequal pads use conv2d's symmetric padding and crop the output.
    """
    left, right, top, bottom = pad
    if min(pad) < 0:
        x = x[..., max(0, -top) : x.shape[-2] - max(0, -bottom), max(0, -left) : x.shape[-1] - max(0, -right)]
        left, right, top, bottom = (max(0, v) for v in pad)
    py, px = max(top, bottom), max(left, right)
    out = F.conv2d(x, weight, padding=(py, px))
    if (top, left) == (bottom, right):
        return out
    rows = x.shape[-2] + top + bottom - weight.shape[-2] + 1
    cols = x.shape[-1] + left + right - weight.shape[-1] + 1
    return out[..., py - top : py - top + rows, px - left : px - left + cols]


Operator = DirectOperator | CircularOperator | CircularPolyphaseOperator | PolyphaseOperator


def make_operator(weight: Tensor, stride: int, height: int, width: int, padding_mode: str = "zeros",
                  backend: str = "polyphase", interleave: int | None = None,
                  transposed_decode: bool | None = None) -> Operator:
    """Choose the operator for a boundary mode and backend (``polyphase`` or ``direct``).

    ``polyphase`` uses :func:`auto_interleave` unless ``interleave`` is given (1 where the grid does not
    divide); circular boundaries fall back to :class:`CircularOperator` where the polyphase form fails.
    """
    if backend not in ("polyphase", "direct"):
        raise ValueError(f"backend must be 'polyphase' or 'direct', got {backend!r}")
    circular = padding_mode == "circular"
    if backend == "direct":
        return (CircularOperator if circular else DirectOperator)(weight, stride, height, width)
    kind = CircularPolyphaseOperator if circular else PolyphaseOperator
    auto = sorted({auto_interleave(weight, stride), 1}, reverse=True)
    for r in [interleave] if interleave is not None else auto:
        try:
            return kind(weight, stride, height, width, interleave=r, transposed_decode=transposed_decode)
        except ValueError:
            if interleave is not None and not circular:
                raise
    return CircularOperator(weight, stride, height, width)
