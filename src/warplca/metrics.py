"""torchmetrics metrics for sparse coding: sparsity, energy and reconstruction quality.

All of them are :class:`torchmetrics.Metric` objects with ``dist_reduce_fx="sum"`` states, so they
accumulate over batches and synchronise across DDP ranks by themselves (log the metric object, or
call :meth:`compute`, once per epoch). Use one object per stage (train / val / test).

Conventions (README, "The maths"; docs/architecture.md, "Conventions"):

- PSNR and SSIM compare reconstructions and clean images on the **[0, 1] pixel scale** (undo the
  normalisation and clamp first) with ``data_range=1.0`` passed explicitly. PSNR is the mean over
  images of the per-image PSNR (not the PSNR of the pooled MSE), SSIM the mean per-image SSIM.
- Sparsity counts exact non-zeros of the activations ``a``.
- Energy is the per-image LCA energy ``E(a) = ½‖x − Φa‖² + Σ P_λ(a)`` (``LCA.energy`` or
  ``LCAResult.energy``); ``energy_norm`` divides each image's energy by its number of pixel values.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

__all__ = ["EnergyMetric", "SparsityMetric", "reconstruction_metrics"]


class SparsityMetric(Metric):
    """Fraction of non-zero code entries and mean number of non-zeros per image.

    ``update(a)`` takes codes of shape (B, …); ``compute()`` returns
    ``{"l0_frac": nnz / numel, "l0_per_image": nnz / B}`` over everything seen since the last reset.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    nnz: Tensor
    numel: Tensor
    images: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("nnz", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("numel", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, a: Tensor) -> None:  # type: ignore[override]
        if not isinstance(a, Tensor) or a.dim() < 1:
            got = getattr(a, "shape", a)
            raise ValueError(f"SparsityMetric.update expects codes of shape (B, ...), got {got}")
        self.nnz += torch.count_nonzero(a).to(torch.float64)
        self.numel += float(a.numel())
        self.images += float(a.shape[0])

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        numel = self.numel.clamp_min(1.0)
        images = self.images.clamp_min(1.0)
        return {"l0_frac": (self.nnz / numel).float(), "l0_per_image": (self.nnz / images).float()}


class EnergyMetric(Metric):
    """Mean per-image LCA energy and its per-pixel-value normalised form.

    ``update(energy, numel_per_image)`` takes the per-image energies (B,) and the number of values in
    one image (C·H·W); ``compute()`` returns ``{"energy": mean E, "energy_norm": mean E / numel}``.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    total: Tensor
    total_norm: Tensor
    images: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_norm", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

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
    """PSNR and SSIM (keys ``psnr``, ``ssim``) on the [0, 1] pixel scale, ``data_range=1.0``.

    ``update(preds, target)`` takes (B, C, H, W) reconstructions and clean images in [0, 1]; PSNR is
    averaged per image (``dim=(1, 2, 3)``). ``prefix`` (e.g. ``"val/"``) is prepended to the keys.
    """
    return MetricCollection(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean"),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        },
        prefix=prefix,
    )
