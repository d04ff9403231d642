"""Dictionary learning with LCA codes (the ``dictionary`` stage's LightningModule).

Per batch: codes ``a = LCA(x)`` from a cold start without autograd (constants for the atom update),
one optimiser step on ``½‖x − Φa‖² / B`` w.r.t. Φ, then every atom back to unit ℓ2 norm (the penalty is
scale-dependent). Every ``resample_every`` steps rarely used atoms are replaced by high-residual image
patches. Each epoch logs atom usage, L = ‖Φ‖²_op and the atom grid. ``x`` is the normalised image;
PSNR and SSIM are measured on the [0, 1] pixel scale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from warplca.coder import SparseCoder
from warplca.data.normalization import Normalization
from warplca.lca import LCA, ConvDictionary, atom_usage, dead_atoms, resample_atoms, used_atoms
from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.plotting import atom_grid, image_grid
from warplca.settings import Annotated, Doc, Ge, Gt, Le, OneOf, checked

log = logging.getLogger(__name__)

__all__ = ["DictionaryLearning", "log_image"]

_STAGES = ("train", "val", "test")
_OPTIMIZERS = ("adam", "sgd")


def log_image(loggers: Iterable[Any], tag: str, image: Any, step: int) -> None:
    """Send an (H, W, 3) float image to every logger that takes images (TensorBoard, wandb)."""
    for lg in loggers:
        kind = type(lg).__name__
        try:
            if kind == "TensorBoardLogger":
                lg.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            elif kind == "WandbLogger":
                lg.log_image(key=tag, images=[image], step=step)
        except Exception:  # an image is never worth a failed run
            log.warning("could not log image %s to %s", tag, kind, exc_info=True)


class DictionaryLearning(pl.LightningModule):
    """Learn the atoms of ``dictionary`` from LCA codes.

    Args:
        dictionary: the atoms to learn (updated in place).
        lca_settings: keyword arguments of :class:`warplca.LCA` (its ``iters`` is replaced by ``iters``).
        normalization: [0, 1] pixels → the space the atoms code in.
        optimizer: ``"adam"``, ``"sgd"`` (momentum 0.9) or a callable ``params -> Optimizer`` (``lr`` is
            passed unless it is a ``functools.partial`` that fixes one).
        iters: LCA steps per batch, for training and validation.
        test_iters: LCA steps for the test metrics (default ``iters``).
        log_images_every_n_epochs: log the atom grid and ``n_log_images`` reconstructions every n
            validation epochs (0: never).
        coherence_weight, coherence_target: β and L₀ of the penalty β·max(‖Φv‖² − L₀, 0), v the top
            eigenvector of ΦᵀΦ (so ‖Φv‖² = L = ‖Φ‖²_op; a large L means a small stable LCA step).
        resample_every: every this many steps, resample the atoms used less than ``resample_fraction``
            of a uniform share since the last check (0 disables).
        resample_until: stop resampling after this fraction of the run.
        lr_schedule: ``cosine`` (from ``lr`` to ``lr·min_lr_ratio`` over the run) or ``constant``.

    ``dictionary`` and ``normalization`` may be plain dicts (``ConvDictionary.config()``,
    ``Normalization.to_dict()``), as ``load_from_checkpoint`` passes them.
    """

    @checked
    def __init__(self, dictionary: ConvDictionary | Mapping[str, Any], lca_settings: Mapping[str, Any],
                 normalization: Normalization | Mapping[str, Any],
                 lr: Annotated[float, Gt(0)] = 0.5,
                 optimizer: Annotated[str | Callable[..., torch.optim.Optimizer],
                                      OneOf(_OPTIMIZERS, "optimizer")] = "sgd",
                 iters: Annotated[int, Ge(1), Doc("LCA steps per batch")] = 50,
                 test_iters: Annotated[int | None, Ge(1), Doc("LCA steps of the test metrics")] = 100,
                 log_images_every_n_epochs: Annotated[int, Ge(0)] = 1,
                 n_log_images: Annotated[int, Ge(0)] = 16,
                 coherence_weight: Annotated[float, Ge(0), Doc("β of the coherence penalty")] = 0.0,
                 coherence_target: Annotated[float, Ge(0), Doc("the ‖Φ‖²_op below which it is 0")] = 0.0,
                 resample_every: Annotated[int, Ge(0), Doc("steps between dead-atom checks (0: never)")] = 20,
                 resample_fraction: Annotated[float, Ge(0), Le(1)] = 0.1,
                 resample_until: Annotated[float, Ge(0), Le(1)] = 0.8,
                 lr_schedule: Literal["cosine", "constant"] = "cosine",
                 min_lr_ratio: Annotated[float, Ge(0), Le(1)] = 0.05) -> None:
        super().__init__()
        if isinstance(dictionary, Mapping):
            dictionary = ConvDictionary(**dictionary)
        if isinstance(normalization, Mapping):
            normalization = Normalization.from_dict(normalization)
        if normalization.channels != dictionary.in_channels:
            raise ValueError(f"normalization has {normalization.channels} channels but the dictionary "
                             f"{dictionary.in_channels}")
        self.resample_every, self.resample_fraction = resample_every, float(resample_fraction)
        self.resample_until = float(resample_until)
        self.lr_schedule, self.min_lr_ratio = lr_schedule, float(min_lr_ratio)
        self.coherence_weight, self.coherence_target = float(coherence_weight), float(coherence_target)
        self.lr, self.optimizer_factory, self.iters = float(lr), optimizer, iters
        self.test_iters = iters if test_iters is None else test_iters
        self.log_images_every_n_epochs, self.n_log_images = int(log_images_every_n_epochs), int(n_log_images)
        self.dictionary, self.normalization = dictionary, normalization
        self.lca = LCA(dictionary, **{**lca_settings, "iters": iters})
        # shares the modules, kept out of the module tree so checkpoints keep their keys
        self.__dict__["_coder"] = SparseCoder(dictionary, self.lca, normalization)
        # plain arguments for load_from_checkpoint (a callable optimizer comes back as Adam)
        plain = ("lr", "iters", "test_iters", "log_images_every_n_epochs", "n_log_images", "coherence_weight",
                 "coherence_target", "resample_every", "resample_fraction", "resample_until", "lr_schedule",
                 "min_lr_ratio")
        self.save_hyperparameters({
            "dictionary": dictionary.config(), "lca_settings": {**self.lca.settings(), "iters": iters},
            "normalization": normalization.to_dict(),
            "optimizer": optimizer if isinstance(optimizer, str) else "adam",
            **{name: getattr(self, name) for name in plain}})
        for stage in _STAGES:
            setattr(self, f"{stage}_recon", reconstruction_metrics())
            setattr(self, f"{stage}_sparsity", SparsityMetric())
            setattr(self, f"{stage}_energy", EnergyMetric())
        self._preview: tuple[Tensor, Tensor] | None = None
        # activations per atom: since the last resampling check, and over the current epoch
        for name in ("usage_window", "usage_epoch"):
            self.register_buffer(name, torch.zeros(dictionary.n_atoms, dtype=torch.float64), persistent=False)
        self.resampled_total = 0
        self._total_steps: int | None = None  # set in on_train_start

    @property
    def coder(self) -> SparseCoder:
        """The dictionary being learned with its LCA and normalisation."""
        return self.__dict__["_coder"]

    def forward(self, images: Tensor) -> tuple[Tensor, Any]:
        """LCA-code [0, 1] images; returns (reconstruction on the [0, 1] pixel scale, LCAResult)."""
        coded = self.coder.code(images)
        return coded.pixels, coded.result

    def _step(self, batch: Any, stage: str) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = self.coder.preprocess(images)
        res = self.lca(x, iters=self.test_iters if stage == "test" else None)
        if stage == "train":
            # the atom update stays fp32 under a bf16-mixed trainer, like the LCA codes it uses
            with torch.autocast(device_type=x.device.type, enabled=False):
                recon = self.dictionary.decode(res.a, size=tuple(x.shape[-2:]))
                loss = 0.5 * (x.float() - recon).pow(2).sum() / x.shape[0]
                if self.coherence_weight > 0:
                    loss = loss + self._coherence_penalty(*x.shape[-2:])
            usage = atom_usage(res.a.detach())
            self.usage_window += usage
            self.usage_epoch += usage
            self._last_batch = (x.detach().float(), x.detach().float() - recon.detach())
            self._image_size = (int(x.shape[-2]), int(x.shape[-1]))
        else:
            recon = res.recon
            loss = 0.5 * (x - recon).pow(2).sum() / x.shape[0]
        pixels = self.coder.postprocess(recon.detach(), images)
        getattr(self, f"{stage}_recon").update(pixels, images)
        getattr(self, f"{stage}_sparsity").update(res.a)
        getattr(self, f"{stage}_energy").update(res.energy, x[0].numel())
        self.log(f"{stage}/loss", loss.detach(), prog_bar=stage == "train", on_step=stage == "train",
                 on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if stage == "val" and self._preview is None:
            self._preview = (images[: self.n_log_images].detach().cpu(), pixels[: self.n_log_images].cpu())
        return loss

    def _coherence_penalty(self, height: int, width: int) -> Tensor:
        """β·max(‖Φv‖² − L₀, 0) for the top eigenvector v of ΦᵀΦ (its gradient lowers L)."""
        v = self.dictionary.top_eigenvector(height, width)
        lipschitz = self.dictionary.decode(v, size=(height, width)).pow(2).sum()
        self.log("train/lipschitz", lipschitz.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return self.coherence_weight * torch.relu(lipschitz - self.coherence_target)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        """The optimiser step, then every atom back to unit norm (keeps λ meaningful), then resampling."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.dictionary.normalize_()
        step, total = self.global_step + 1, self._total_steps  # this step included
        late = total is not None and step > self.resample_until * total
        if self.resample_every and step % self.resample_every == 0 and not late:
            self._resample(optimizer)

    @torch.no_grad()
    def _resample(self, optimizer: Any) -> None:
        """Replace the atoms used too rarely since the last check by high-residual patches."""
        # summed over ranks: every rank must replace the same atoms with the same patches
        dead = dead_atoms(self._rank_sum(self.usage_window).cpu(), self.resample_fraction)
        batch = getattr(self, "_last_batch", None)
        self.usage_window.zero_()
        if dead.numel() == 0 or batch is None:
            return
        if self.trainer.world_size > 1:
            batch = self.trainer.strategy.broadcast(batch, src=0)
        x, residual = batch
        replaced = resample_atoms(self.dictionary, residual, dead.to(self.dictionary.weight.device), images=x)
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps the torch optimiser
        state = inner.state.get(self.dictionary.weight, {})
        for moment in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if isinstance(state.get(moment), Tensor):
                state[moment][replaced] = 0
        self.resampled_total += int(replaced.numel())
        log.debug("step %d: resampled %d atoms", self.global_step, replaced.numel())

    def _rank_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the DDP ranks (``t`` itself on one process)."""
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum") if self.trainer.world_size > 1 else t

    def _log_epoch(self, stage: str) -> None:
        if getattr(self, f"{stage}_sparsity").update_count == 0:  # all three are updated together
            return
        for kind in ("recon", "sparsity", "energy"):
            metric = getattr(self, f"{stage}_{kind}")
            for name, value in metric.compute().items():
                self.log(f"{stage}/{name}", value, prog_bar=stage == "val" and name == "psnr", sync_dist=True)
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        usage = self._rank_sum(self.usage_epoch)
        share = usage / usage.sum().clamp_min(1.0)
        height, width = getattr(self, "_image_size", (32, 32))
        metrics = {"train/atoms_used": float(used_atoms(usage)),
                   "train/lipschitz": float(self.dictionary.operator_norm(height, width)),
                   "train/atoms_resampled": float(self.resampled_total)}
        metrics.update({f"atom_usage/{i:02d}": float(v) for i, v in enumerate(share.tolist())})
        self.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True)
        self.usage_epoch.zero_()
        if self.trainer.is_global_zero and self.log_images_every_n_epochs > 0:
            log_image(self.loggers, "atoms_by_epoch", atom_grid(self.dictionary.weight), self.current_epoch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        n = self.log_images_every_n_epochs
        if (n > 0 and self._preview is not None and self.current_epoch % n == 0
                and self.trainer.is_global_zero and not self.trainer.sanity_checking):
            self.log_images()
        self._preview = None

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def log_images(self) -> None:
        """Log the atom grid and (originals | reconstructions) of the first val batch."""
        step = self.global_step
        log_image(self.loggers, "atoms", atom_grid(self.dictionary.weight), step)
        if self._preview is not None:
            images, recon = self._preview
            both = torch.stack([images, recon], dim=1).flatten(0, 1)  # original, recon, original, …
            log_image(self.loggers, "reconstructions", image_grid(both, ncol=8), step)

    def configure_optimizers(self) -> Any:
        params, factory = self.dictionary.parameters(), self.optimizer_factory
        if isinstance(factory, str) and factory.lower() == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif isinstance(factory, str):
            opt = torch.optim.Adam(params, lr=self.lr)
        else:
            keywords = getattr(factory, "keywords", None) or {}
            opt = factory(params) if "lr" in keywords else factory(params, lr=self.lr)
        if self.lr_schedule != "cosine":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._cosine_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _cosine_factor(self, step: int) -> float:
        """lr multiplier at ``step``: cosine from 1 to ``min_lr_ratio`` over the run's optimiser steps."""
        total, floor = self._total_steps, self.min_lr_ratio
        if not total:
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def on_train_start(self) -> None:
        # the run's length in optimiser steps, here: estimated_stepping_batches in configure_optimizers
        # would build the training loader before a resumed checkpoint restores its mid-epoch position
        trainer, total = self.trainer, None
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(per_epoch):
            total = trainer.max_epochs * math.ceil(per_epoch / max(1, trainer.accumulate_grad_batches))
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = trainer.max_steps if total is None else min(total, trainer.max_steps)
        self._total_steps = total
