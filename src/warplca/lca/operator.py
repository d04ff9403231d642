"""Fast synthesis Φ and analysis Φᵀ for one image size, as two stride-1 ``conv2d`` calls.

A stride-s convolution with a k×k kernel equals a stride-1 convolution on the space-to-depth
(``pixel_unshuffle``) image with a ⌈k/s⌉×⌈k/s⌉ kernel of C·s² input channels (the polyphase form).
Its adjoint, the transposed convolution that decodes codes into images, is then an ordinary
``conv2d`` with the flipped kernel followed by ``pixel_shuffle``. Plain ``conv2d`` is the most
optimised kernel on every backend, whereas ``conv_transpose2d`` dominates a naive LCA step.

The solver keeps pixels in the space-to-depth domain for the whole run: the image x and each
reconstruction Φa live there as tensors ``X̃`` of shape (B, C·s², rows, cols) covering exactly the
image pixels (entries outside the image are masked to zero), so ‖x − Φa‖ = ‖X̃ − Φ̃a‖ and no
shuffles are needed inside the loop. ``image()`` maps back to (B, C, H, W).

``DirectOperator`` is the textbook form (``conv_transpose2d`` / ``conv2d``) and ``CircularOperator``
uses periodic boundaries (stride 1 and 2 … any), matching FFT-based solvers such as sporco.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_layout(weight: Tensor) -> torch.memory_format:
    """Memory layout for the solver's tensors: NHWC ("channels_last") where oneDNN / cuDNN have
    fast kernels for it (CUDA; CPU float32 / float16 / bfloat16), NCHW for CPU float64, whose only
    NHWC convolution is a slow reference path (~15× slower)."""
    if weight.device.type == "cpu" and weight.dtype == torch.float64:
        return torch.contiguous_format
    return torch.channels_last


def code_size(size: int, stride: int) -> int:
    """Code-grid length ⌈size / stride⌉."""
    return -(-size // stride)


class DirectOperator:
    """Φ and Φᵀ with zero ("same") padding via ``conv_transpose2d`` and ``conv2d``."""

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        self.weight, self.stride, self.height, self.width = weight, stride, height, width
        k = weight.shape[-1]
        self.pad = (k - 1) // 2
        self.code_shape = (weight.shape[0], code_size(height, stride), code_size(width, stride))
        self.out_pad = (height - 1 - (self.code_shape[1] - 1) * stride,
                        width - 1 - (self.code_shape[2] - 1) * stride)

    def pixels(self, x: Tensor) -> Tensor:
        return x

    def image(self, xt: Tensor) -> Tensor:
        return xt

    def decode(self, a: Tensor) -> Tensor:
        return F.conv_transpose2d(a, self.weight, stride=self.stride, padding=self.pad,
                                  output_padding=self.out_pad)

    def encode(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self.weight, stride=self.stride, padding=self.pad)


class CircularOperator:
    """Φ and Φᵀ with periodic boundaries (the atom centred on its code position)."""

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        self.weight, self.stride, self.height, self.width = weight, stride, height, width
        k = weight.shape[-1]
        self.pad = (k - 1) // 2
        if self.pad > min(height, width):
            raise ValueError(f"circular padding needs images of at least {self.pad} pixels, "
                             f"got {height}×{width}")
        self.code_shape = (weight.shape[0], code_size(height, stride), code_size(width, stride))

    def pixels(self, x: Tensor) -> Tensor:
        return x

    def image(self, xt: Tensor) -> Tensor:
        return xt

    def encode(self, r: Tensor) -> Tensor:
        p = self.pad
        padded = F.pad(r, (p, p, p, p), mode="circular")
        out = F.conv2d(padded, self.weight, stride=self.stride)
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


class PolyphaseOperator:
    """Φ and Φᵀ with zero ("same") padding as stride-1 ``conv2d`` in the space-to-depth domain."""

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        n_atoms, channels, k, _ = weight.shape
        s = stride
        self.stride, self.height, self.width = s, height, width
        self.pad = p = (k - 1) // 2
        self.kq = kq = math.ceil(k / s)
        hc, wc = code_size(height, s), code_size(width, s)
        self.code_shape = (n_atoms, hc, wc)
        # Encode kernel: W_enc[k, c·s² + ry·s + rx, qy, qx] = Φ[k, c, s·qy + ry, s·qx + rx].
        wpad = F.pad(weight, (0, kq * s - k, 0, kq * s - k))
        w_enc = wpad.reshape(n_atoms, channels, kq, s, kq, s).permute(0, 1, 3, 5, 2, 4)
        self.w_enc = w_enc.reshape(n_atoms, channels * s * s, kq, kq).contiguous()
        self.w_dec = self.w_enc.transpose(0, 1).flip(2, 3).contiguous()
        # Space-to-depth rows/cols that hold image pixels: [lo, hi] inclusive.
        self.rows = (p // s, (p + height - 1) // s)
        self.cols = (p // s, (p + width - 1) // s)
        r_lo, r_hi = self.rows
        c_lo, c_hi = self.cols
        self.dec_pad = (kq - 1 - c_lo, c_hi - (wc - 1), kq - 1 - r_lo, r_hi - (hc - 1))
        self.enc_pad = (c_lo, max(0, wc + kq - 2 - c_hi), r_lo, max(0, hc + kq - 2 - r_hi))
        self.img_pad = (p - s * c_lo, s * (c_hi + 1) - p - width, p - s * r_lo, s * (r_hi + 1) - p - height)
        self.mask = self._mask(weight, channels)
        self.layout = fmt = conv_layout(weight)
        self.w_enc = self.w_enc.contiguous(memory_format=fmt)
        self.w_dec = self.w_dec.contiguous(memory_format=fmt)
        if self.mask is not None:
            self.mask = self.mask.contiguous(memory_format=fmt)

    def _mask(self, weight: Tensor, channels: int) -> Tensor | None:
        s, p = self.stride, self.pad

        def valid(lo: int, hi: int, n: int) -> Tensor:
            pos = s * torch.arange(lo, hi + 1, device=weight.device)[None, :] + torch.arange(
                s, device=weight.device)[:, None]
            return (pos >= p) & (pos < p + n)  # (s, count)

        rv = valid(*self.rows, self.height)
        cv = valid(*self.cols, self.width)
        if bool(rv.all()) and bool(cv.all()):
            return None
        m = rv[:, None, :, None] & cv[None, :, None, :]  # (ry, rx, r, c)
        m = m.reshape(1, 1, s * s, *m.shape[-2:]).expand(1, channels, s * s, *m.shape[-2:])
        return m.reshape(1, channels * s * s, *m.shape[-2:]).to(weight.dtype)

    def pixels(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) → masked space-to-depth tensor X̃."""
        xt = F.pixel_unshuffle(F.pad(x, self.img_pad), self.stride)
        return xt.contiguous(memory_format=self.layout)

    def image(self, xt: Tensor) -> Tensor:
        """Space-to-depth tensor → image (B, C, H, W)."""
        full = F.pixel_shuffle(xt, self.stride)
        left, _, top, _ = self.img_pad
        return full[..., top : top + self.height, left : left + self.width]

    def decode(self, a: Tensor) -> Tensor:
        """Codes (B, K, H', W') → reconstruction Φa in the space-to-depth domain."""
        out = _conv_padded(a, self.w_dec, self.dec_pad)
        return out if self.mask is None else out.mul_(self.mask)

    def encode(self, xt: Tensor) -> Tensor:
        """Space-to-depth pixels → analysis Φᵀr on the code grid (B, K, H', W')."""
        out = _conv_padded(xt, self.w_enc, self.enc_pad)
        return out[..., : self.code_shape[1], : self.code_shape[2]]


class CircularPolyphaseOperator:
    """Periodic Φ and Φᵀ as stride-1 ``conv2d`` on the space-to-depth grid (H, W multiples of s).

    With period H = s·H', wrapping the image is wrapping the code grid, so both operators are a
    circular pad of a few rows/columns and one ``conv2d`` — no transposed convolution and no
    scatter. Pixels live in the space-to-depth domain of the image rolled by p = (k−1)/2 (a
    permutation, so norms are unchanged); :meth:`image` undoes it.
    """

    def __init__(self, weight: Tensor, stride: int, height: int, width: int) -> None:
        n_atoms, channels, k, _ = weight.shape
        s = stride
        if height % s or width % s:
            raise ValueError(f"the circular polyphase operator needs H, W divisible by the stride {s}, "
                             f"got {height}×{width}")
        self.stride, self.height, self.width = s, height, width
        self.pad = (k - 1) // 2
        self.kq = kq = math.ceil(k / s)
        self.code_shape = (n_atoms, height // s, width // s)
        if kq - 1 > min(self.code_shape[1:]):
            raise ValueError(f"atoms of size {k} wrap more than once around {height}×{width} images")
        wpad = F.pad(weight, (0, kq * s - k, 0, kq * s - k))
        w_enc = wpad.reshape(n_atoms, channels, kq, s, kq, s).permute(0, 1, 3, 5, 2, 4)
        w_enc = w_enc.reshape(n_atoms, channels * s * s, kq, kq)
        self.layout = fmt = conv_layout(weight)
        self.w_enc = w_enc.contiguous(memory_format=fmt)
        self.w_dec = w_enc.transpose(0, 1).flip(2, 3).contiguous(memory_format=fmt)
        self.mask = None

    def pixels(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) → space-to-depth tensor of the image rolled by p."""
        rolled = torch.roll(x, shifts=(self.pad, self.pad), dims=(-2, -1))
        return F.pixel_unshuffle(rolled, self.stride).contiguous(memory_format=self.layout)

    def image(self, xt: Tensor) -> Tensor:
        return torch.roll(F.pixel_shuffle(xt, self.stride), shifts=(-self.pad, -self.pad), dims=(-2, -1))

    def decode(self, a: Tensor) -> Tensor:
        q = self.kq - 1
        return F.conv2d(_wrap(a, (q, 0, q, 0), self.layout), self.w_dec)

    def encode(self, xt: Tensor) -> Tensor:
        q = self.kq - 1
        return F.conv2d(_wrap(xt, (0, q, 0, q), self.layout), self.w_enc)


def _wrap(t: Tensor, pad: tuple[int, int, int, int], layout: torch.memory_format) -> Tensor:
    """Circular padding (left, right, top, bottom) in the given memory layout."""
    if not any(pad):
        return t
    return F.pad(t, pad, mode="circular").contiguous(memory_format=layout)


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
    k_h, k_w = weight.shape[-2:]
    rows = x.shape[-2] + top + bottom - k_h + 1
    cols = x.shape[-1] + left + right - k_w + 1
    return out[..., py - top : py - top + rows, px - left : px - left + cols]


Operator = DirectOperator | CircularOperator | CircularPolyphaseOperator | PolyphaseOperator


def make_operator(weight: Tensor, stride: int, height: int, width: int, padding_mode: str = "zeros",
                  backend: str = "polyphase") -> Operator:
    """Choose the operator for a boundary mode and backend (``polyphase`` or ``direct``).

    Circular boundaries use the space-to-depth form when H and W are multiples of the stride
    (always at stride 1) and the atoms wrap at most once; otherwise, and for ``direct``, the
    textbook transposed convolution with a fold.
    """
    if backend not in ("polyphase", "direct"):
        raise ValueError(f"backend must be 'polyphase' or 'direct', got {backend!r}")
    if padding_mode == "circular":
        kq = math.ceil(weight.shape[-1] / stride)
        if (backend == "polyphase" and height % stride == 0 and width % stride == 0
                and kq - 1 <= min(height, width) // stride):
            return CircularPolyphaseOperator(weight, stride, height, width)
        return CircularOperator(weight, stride, height, width)
    if backend == "direct":
        return DirectOperator(weight, stride, height, width)
    return PolyphaseOperator(weight, stride, height, width)
