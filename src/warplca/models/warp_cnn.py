"""WARP-CNN: the fully convolutional state predictor f_θ of WARP-LCA.

f_θ maps normalised images x (B, C, H, W) to LCA states û (B, K, ⌈H/s⌉, ⌈W/s⌉) for any H, W. All layers
run at code resolution: x is zero-padded to a multiple of s and space-to-depth'd (a lossless strided
stem), optionally joined by the drive Φᵀx, then a stem convolution, ``depth − 1`` pre-activation
residual convolutions and a 1×1 head. No batch normalisation: predictions never depend on the batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from warplca.settings import Annotated, Doc, Ge, Gt, Odd, OneOf, checked

__all__ = ["ACTIVATIONS", "WarpCNN"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


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

    @checked
    def __init__(self, in_channels: Annotated[int, Ge(1)], n_atoms: Annotated[int, Ge(1)],
                 stride: Annotated[int, Ge(1)], width: Annotated[int, Ge(1), Doc("hidden channels")] = 64,
                 depth: Annotated[int, Ge(1), Doc("k×k convolutions: stem + depth − 1 residual")] = 5,
                 kernel_size: Annotated[int, Ge(1), Odd(), Doc("same padding keeps the code grid")] = 3,
                 use_drive: Annotated[bool, Doc("also feed the drive Φᵀx of the fixed dictionary")] = False,
                 drive_mode: Literal["concat", "residual"] = "concat",
                 stem_kernel_size: Annotated[int | None, Ge(1), Odd(),
                                             Doc("kernel of the first conv (null: kernel_size)")] = None,
                 activation: Annotated[str, OneOf(ACTIVATIONS, "activation")] = "gelu",
                 drive_scale: Annotated[float | Literal["auto"], Gt(0),
                                        Doc("c of the drive c·Φᵀx; auto: 1/‖Φ‖²_op")] = "auto") -> None:
        super().__init__()
        if use_drive and drive_scale == "auto":
            raise ValueError("drive_scale=auto needs the dictionary: pass 1 / dictionary.operator_norm() "
                             "(the pipeline does so for the predictor group)")
        self.in_channels, self.n_atoms, self.stride = in_channels, n_atoms, stride
        self.width, self.depth, self.kernel_size = width, depth, kernel_size
        self.stem_kernel_size = stem_kernel_size or kernel_size
        self.drive_scale = drive_scale if drive_scale == "auto" else float(drive_scale)
        self.use_drive, self.drive_mode, self.activation = use_drive, drive_mode, activation

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
            drive = drive.to(x.dtype) * self.drive_scale  # type: ignore[operator]
        if self.use_drive and self.drive_mode == "concat":
            x = torch.cat([x, drive], dim=1)
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        out = self.head(h)
        if self.use_drive and self.drive_mode == "residual":
            out = out + drive
        return out

