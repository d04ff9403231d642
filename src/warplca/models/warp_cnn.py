"""WARP-CNN: the fully convolutional state predictor f_θ of WARP-LCA.

f_θ maps normalised images x (B, C, H, W) to LCA states û (B, K, ⌈H/s⌉, ⌈W/s⌉) for any H, W. All layers
run at code resolution: x is zero-padded to a multiple of s and space-to-depth'd (a lossless strided
stem), optionally joined by the drive Φᵀx, then a stem convolution, ``depth − 1`` pre-activation
residual convolutions and a 1×1 head. No batch normalisation: predictions never depend on the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "DRIVE_MODES", "WarpCNN"]

DRIVE_MODES = ("concat", "residual")
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class WarpCNN(nn.Module):
    """Fully convolutional state predictor: images (B, C, H, W) → states (B, K, ⌈H/s⌉, ⌈W/s⌉).

    Args:
        in_channels, n_atoms, stride: the dictionary's C, K and s.
        width, depth: hidden channels; number of k×k convolutions (stem + ``depth − 1`` residual layers).
        kernel_size: odd kernel size k of the hidden convolutions (at code resolution).
        use_drive: take the encoder drive Φᵀx (B, K, H', W') as a second input (the caller computes it).
        drive_mode: ``concat`` (drive as extra input channels) or ``residual`` (û = c·Φᵀx + f(x)).
        stem_kernel_size: kernel of the stem convolution (default ``kernel_size``).
        activation: ``gelu`` (default), ``relu`` or ``silu``.
        drive_scale: factor c on the drive. Φᵀx ≈ ΦᵀΦ·u* is up to ‖Φ‖²_op times larger than the
            states; c = 1/‖Φ‖²_op (``drive_scale: auto``) matches their scale (unscaled trains worse).
    """

    def __init__(self, in_channels: int, n_atoms: int, stride: int, width: int = 64, depth: int = 3,
                 kernel_size: int = 3, use_drive: bool = False, drive_mode: str = "concat",
                 stem_kernel_size: int | None = None, activation: str = "gelu",
                 drive_scale: float = 1.0) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.n_atoms = _positive_int("n_atoms", n_atoms)
        self.stride = _positive_int("stride", stride)
        self.width = _positive_int("width", width)
        self.depth = _positive_int("depth", depth)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stem_kernel_size = _positive_int("stem_kernel_size", stem_kernel_size or kernel_size)
        for name, k in (("kernel_size", self.kernel_size), ("stem_kernel_size", self.stem_kernel_size)):
            if k % 2 == 0:
                raise ValueError(f"{name} must be odd (same padding keeps the code grid), got {k}")
        if drive_mode not in DRIVE_MODES:
            raise ValueError(f"drive_mode must be one of {DRIVE_MODES}, got {drive_mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if isinstance(drive_scale, bool) or not isinstance(drive_scale, (int, float)) or not (
                math.isfinite(drive_scale) and drive_scale > 0):
            raise ValueError(f"drive_scale must be a finite number > 0, got {drive_scale!r}")
        self.drive_scale = float(drive_scale)
        self.use_drive = bool(use_drive)
        self.drive_mode = drive_mode
        self.activation = activation

        stem_in = in_channels * stride * stride
        if self.use_drive and drive_mode == "concat":
            stem_in += n_atoms
        act = ACTIVATIONS[activation]
        self.stem = nn.Conv2d(stem_in, width, self.stem_kernel_size, padding=self.stem_kernel_size // 2)
        self.blocks = nn.ModuleList(
            nn.Sequential(act(), nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2))
            for _ in range(depth - 1)
        )
        self.head = nn.Sequential(act(), nn.Conv2d(width, n_atoms, 1))

    def config(self) -> dict[str, Any]:
        """Constructor arguments (saved in bundles; ``WarpCNN(**config)`` rebuilds the network)."""
        return {"in_channels": self.in_channels, "n_atoms": self.n_atoms, "stride": self.stride,
                "width": self.width, "depth": self.depth, "kernel_size": self.kernel_size,
                "use_drive": self.use_drive, "drive_mode": self.drive_mode,
                "stem_kernel_size": self.stem_kernel_size, "activation": self.activation,
                "drive_scale": self.drive_scale}

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Output shape (K, ⌈H/s⌉, ⌈W/s⌉) for H×W inputs."""
        return (self.n_atoms, -(-height // self.stride), -(-width // self.stride))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, n_atoms={self.n_atoms}, stride={self.stride}, "
                f"width={self.width}, depth={self.depth}, use_drive={self.use_drive}, "
                f"drive_mode={self.drive_mode!r}")

    def forward(self, x: Tensor, drive: Tensor | None = None) -> Tensor:
        """Predicted states for images ``x`` (and the drive Φᵀx when ``use_drive``)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"WarpCNN expects images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        code = self.code_shape(height, width)
        if self.use_drive:
            if drive is None:
                raise ValueError("this WarpCNN uses the drive Φᵀx (use_drive=True): pass drive=")
            if tuple(drive.shape) != (x.shape[0], *code):
                raise ValueError(f"drive must have shape {(x.shape[0], *code)}, got {tuple(drive.shape)}")
        s = self.stride
        if s > 1:
            pad_h, pad_w = code[1] * s - height, code[2] * s - width
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
            x = F.pixel_unshuffle(x, s)
        if self.use_drive:
            drive = drive.to(x.dtype) * self.drive_scale  # type: ignore[union-attr]
        if self.use_drive and self.drive_mode == "concat":
            x = torch.cat([x, drive], dim=1)
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        out = self.head(h)
        if self.use_drive and self.drive_mode == "residual":
            out = out + drive
        return out

