"""torchmetrics metrics for sparse coding: sparsity, energy and reconstruction quality.

The states are float64 sums (``dist_reduce_fx="sum"``), so the metrics accumulate over batches and
synchronise across DDP ranks by themselves; use one object per stage (train / val / test). PSNR and
SSIM compare reconstructions and clean images on the [0, 1] pixel scale (``data_range=1.0``), averaged
per image; sparsity counts exact non-zeros of the codes; energy is the per-image LCA energy
``E(a) = ½‖x − Φa‖² + Σ P_λ(a)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

__all__ = ["EnergyMetric", "SparsityMetric", "reconstruction_metrics"]


class _SumMetric(Metric):
    """A metric whose states (``_states``) are float64 sums."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False
    _states: tuple[str, ...] = ()

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in self._states:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


class SparsityMetric(_SumMetric):
    """Fraction of non-zero code entries and non-zeros per image: ``update(a)`` with codes (B, …);
    ``compute()`` returns ``{"l0_frac": nnz / numel, "l0_per_image": nnz / B}`` since the last reset."""

    _states = ("nnz", "numel", "images")
    nnz: Tensor
    numel: Tensor
    images: Tensor

    def update(self, a: Tensor) -> None:  # type: ignore[override]
        if not isinstance(a, Tensor) or a.dim() < 1:
            got = getattr(a, "shape", a)
            raise ValueError(f"SparsityMetric.update expects codes of shape (B, ...), got {got}")
        self.nnz += torch.count_nonzero(a).to(torch.float64)
        self.numel += float(a.numel())
        self.images += float(a.shape[0])

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {"l0_frac": (self.nnz / self.numel.clamp_min(1.0)).float(),
                "l0_per_image": (self.nnz / self.images.clamp_min(1.0)).float()}


class EnergyMetric(_SumMetric):
    """Mean per-image LCA energy: ``update(energy, numel_per_image)`` with energies (B,) and C·H·W;
    ``compute()`` returns ``{"energy": mean E, "energy_norm": mean E / numel}``."""

    _states = ("total", "total_norm", "images")
    total: Tensor
    total_norm: Tensor
    images: Tensor

    def update(self, energy: Tensor, numel_per_image: int) -> None:  # type: ignore[override]
        if not isinstance(energy, Tensor) or energy.dim() != 1:
            raise ValueError("EnergyMetric.update expects per-image energies of shape (B,), got "
                             f"{getattr(energy, 'shape', energy)}")
        numel = int(numel_per_image)
        if numel < 1:
            raise ValueError(f"numel_per_image must be a positive integer, got {numel_per_image!r}")
        e = energy.detach().to(torch.float64)
        self.total += e.sum()
        self.total_norm += e.sum() / numel
        self.images += float(e.numel())

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        images = self.images.clamp_min(1.0)
        return {"energy": (self.total / images).float(), "energy_norm": (self.total_norm / images).float()}


def reconstruction_metrics(prefix: str | None = None) -> MetricCollection:
    """PSNR and SSIM (keys ``psnr``, ``ssim``, after ``prefix``) of (B, C, H, W) images in [0, 1],
    ``data_range=1.0``, PSNR averaged per image."""
    return MetricCollection(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean"),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        },
        prefix=prefix,
    )
