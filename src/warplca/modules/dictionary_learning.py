"""Dictionary learning with LCA codes (the ``dictionary`` stage's LightningModule).

Alternating minimisation of the LCA energy over codes and atoms, one batch at a time:

1. codes: ``a = LCA(x)`` for ``iters`` steps from a cold start, **without autograd** (the codes are
   constants for the atom update, as in Olshausen & Field / Rozell et al.);
2. atoms: one optimiser step on ``½‖x − Φa‖² / B`` with respect to Φ;
3. renormalise every atom to unit ℓ2 norm (the penalty is scale-dependent, so the atom scale
   must stay fixed), after every optimiser step;
4. every ``resample_every`` steps, atoms that took less than ``resample_fraction`` of a uniform share
   of the activations since the last check are replaced by the image patches of the last batch where
   the residual is largest (their optimiser moments reset), so no atom stays random noise.

The learning rate follows a cosine schedule over the run (``lr_schedule``). Every epoch logs the number
of used atoms, each atom's share of the activations (``atom_usage/NN``), L = ‖Φ‖²_op and the atom grid.

``x`` is the normalised image (``Normalization.apply``, the ``norm`` group's kind); PSNR and SSIM are
measured on the [0, 1] pixel scale after undoing it. The module knows nothing of Hydra.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from warplca.coder import SparseCoder
from warplca.data.normalization import Normalization
from warplca.lca import LCA, ConvDictionary, atom_usage, dead_atoms, resample_atoms, used_atoms
from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.plotting import atom_grid, image_grid

log = logging.getLogger(__name__)

__all__ = ["DictionaryLearning", "log_image"]

_STAGES = ("train", "val", "test")
_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("cosine", "constant")


def log_image(loggers: Iterable[Any], tag: str, image: Any, step: int) -> None:
    """Send an (H, W, 3) float image to every logger that takes images (TensorBoard, wandb).

    Loggers without image support (CSV) are skipped silently.
    """
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
        dictionary: the atoms to learn (updated in place; unit-norm after every step).
        lca_settings: keyword arguments of :class:`warplca.LCA` (threshold, lam, tau, …); ``iters``
            there is ignored in favour of ``iters`` below.
        normalization: [0, 1] pixels → the space the atoms code in.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9), or a callable ``params -> Optimizer``
            (e.g. a ``functools.partial`` of a torch optimiser; ``lr`` is passed unless it fixes one).
        iters: LCA steps per batch, for training and for the validation metrics.
        test_iters: LCA steps for the test metrics (default ``iters``). Codes after a few dozen steps
            are good enough to learn from but far from converged; test at a larger budget to see
            what the dictionary is worth.
        log_images_every_n_epochs: log the atom grid and a reconstruction grid every n validation
            epochs (0 disables) to loggers that take images.
        n_log_images: images in the reconstruction grid.
        coherence_weight: β of the coherence penalty β·max(L̂ − coherence_target, 0) added to the
            training loss, with L̂ = ‖Φv‖² for the current top eigenvector v of ΦᵀΦ (L̂ = L = ‖Φ‖²_op).
            0 (default) disables it. A coherent dictionary has a large L, so the stable LCA step
            η = 1/L is small and every LCA run (cold or warm) needs many more steps.
        coherence_target: the L below which the penalty is zero.
        resample_every: check atom usage every this many training steps and resample the atoms used
            less than ``resample_fraction`` of a uniform share since the last check (0 disables).
        resample_fraction: the usage floor, as a fraction of a uniform share (1/20: the "used" criterion).
        resample_until: stop resampling after this fraction of the run, so late atoms can settle.
        lr_schedule: ``cosine`` (from ``lr`` to ``lr·min_lr_ratio`` over the run) or ``constant``.
        min_lr_ratio: the final learning rate of the cosine schedule, as a fraction of ``lr``.

    ``dictionary`` and ``normalization`` may also be given as their plain-dict forms
    (``ConvDictionary.config()``, ``Normalization.to_dict()``), which is how
    ``DictionaryLearning.load_from_checkpoint`` rebuilds the module.
    """

    def __init__(self, dictionary: ConvDictionary | Mapping[str, Any], lca_settings: Mapping[str, Any],
                 normalization: Normalization | Mapping[str, Any], lr: float = 3e-3,
                 optimizer: str | Callable[..., torch.optim.Optimizer] = "adam", iters: int = 100,
                 test_iters: int | None = None, log_images_every_n_epochs: int = 1,
                 n_log_images: int = 16, coherence_weight: float = 0.0,
                 coherence_target: float = 0.0, resample_every: int = 0,
                 resample_fraction: float = 1.0 / 20.0, resample_until: float = 0.75,
                 lr_schedule: str = "constant", min_lr_ratio: float = 0.05) -> None:
        super().__init__()
        if isinstance(dictionary, Mapping):
            dictionary = ConvDictionary(**dictionary)
        if isinstance(normalization, Mapping):
            normalization = Normalization.from_dict(normalization)
        if not isinstance(dictionary, ConvDictionary):
            raise ValueError(f"dictionary must be a ConvDictionary, got {type(dictionary).__name__}")
        if not isinstance(normalization, Normalization):
            raise ValueError(f"normalization must be a Normalization, got {type(normalization).__name__}")
        if normalization.channels != dictionary.in_channels:
            raise ValueError(f"normalization has {normalization.channels} channels but the dictionary "
                             f"{dictionary.in_channels}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if isinstance(optimizer, str) and optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS} or a callable, got {optimizer!r}")
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ValueError(f"iters must be an integer ≥ 1, got {iters!r}")
        if test_iters is not None and (not isinstance(test_iters, int) or test_iters < 1):
            raise ValueError(f"test_iters must be an integer ≥ 1 or None, got {test_iters!r}")
        for name, value in (("coherence_weight", coherence_weight), ("coherence_target", coherence_target)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if isinstance(resample_every, bool) or not isinstance(resample_every, int) or resample_every < 0:
            raise ValueError(f"resample_every must be an integer ≥ 0, got {resample_every!r}")
        for name, value in (("resample_fraction", resample_fraction), ("resample_until", resample_until),
                            ("min_lr_ratio", min_lr_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {_SCHEDULES}, got {lr_schedule!r}")
        self.resample_every, self.resample_fraction = resample_every, float(resample_fraction)
        self.resample_until = float(resample_until)
        self.lr_schedule, self.min_lr_ratio = lr_schedule, float(min_lr_ratio)
        self.coherence_weight, self.coherence_target = float(coherence_weight), float(coherence_target)
        self.dictionary = dictionary
        settings = dict(lca_settings)
        settings["iters"] = iters
        self.lca = LCA(dictionary, **settings)
        self.normalization = normalization
        # the coder shares the modules and stays out of the module tree, so checkpoints keep their keys
        self.__dict__["_coder"] = SparseCoder(dictionary, self.lca, normalization)
        self.lr = float(lr)
        self.optimizer_factory = optimizer
        self.iters = iters
        self.test_iters = iters if test_iters is None else test_iters
        self.log_images_every_n_epochs = int(log_images_every_n_epochs)
        self.n_log_images = int(n_log_images)
        # the constructor's own arguments in plain form, so load_from_checkpoint can rebuild the module
        # (a callable optimizer is recorded by name only and comes back as Adam)
        self.save_hyperparameters({
            "dictionary": dictionary.config(), "lca_settings": {**self.lca.settings(), "iters": iters},
            "normalization": normalization.to_dict(),
            "lr": self.lr, "optimizer": optimizer if isinstance(optimizer, str) else "adam",
            "iters": iters, "test_iters": self.test_iters,
            "log_images_every_n_epochs": self.log_images_every_n_epochs, "n_log_images": self.n_log_images,
            "coherence_weight": self.coherence_weight, "coherence_target": self.coherence_target,
            "resample_every": resample_every, "resample_fraction": self.resample_fraction,
            "resample_until": self.resample_until, "lr_schedule": lr_schedule,
            "min_lr_ratio": self.min_lr_ratio,
        })
        for stage in _STAGES:
            setattr(self, f"{stage}_recon", reconstruction_metrics())
            setattr(self, f"{stage}_sparsity", SparsityMetric())
            setattr(self, f"{stage}_energy", EnergyMetric())
        self._preview: tuple[Tensor, Tensor] | None = None
        k = dictionary.n_atoms
        # activations per atom: since the last resampling check, and over the current epoch
        self.register_buffer("usage_window", torch.zeros(k, dtype=torch.float64), persistent=False)
        self.register_buffer("usage_epoch", torch.zeros(k, dtype=torch.float64), persistent=False)
        self.resampled_total = 0
        self._total_steps: int | None = None  # set in on_train_start

    # -- the model ------------------------------------------------------------------------------
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
        coder = self.coder
        x = coder.preprocess(images)
        # no autograd: the codes are constants for the atom update
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
        pixels = coder.postprocess(recon.detach(), images)
        getattr(self, f"{stage}_recon").update(pixels, images)
        getattr(self, f"{stage}_sparsity").update(res.a)
        getattr(self, f"{stage}_energy").update(res.energy, x[0].numel())
        self.log(f"{stage}/loss", loss.detach(), prog_bar=stage == "train", on_step=stage == "train",
                 on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if stage == "val" and self._preview is None:
            n = self.n_log_images
            self._preview = (images[:n].detach().cpu(), pixels[:n].cpu())
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
        """The optimiser step, then every atom back to unit norm (keeps λ meaningful); the next LCA
        run re-checks ‖Φ‖²_op because the weight version changed."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.dictionary.normalize_()
        step = self.global_step + 1  # this step included
        total = self._total_steps
        late = total is not None and step > self.resample_until * total
        if self.resample_every and step % self.resample_every == 0 and not late:
            self._resample(optimizer)

    @torch.no_grad()
    def _resample(self, optimizer: Any) -> None:
        """Replace the atoms used too rarely since the last check by high-residual patches."""
        usage = self.usage_window
        if self.trainer.world_size > 1:  # every rank must replace the same atoms with the same patches
            usage = self.trainer.strategy.reduce(usage.clone(), reduce_op="sum")
        dead = dead_atoms(usage.cpu(), self.resample_fraction)
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

    # -- epoch-level metrics --------------------------------------------------------------------
    def _log_epoch(self, stage: str) -> None:
        values: dict[str, Tensor] = {}
        if getattr(self, f"{stage}_sparsity").update_count == 0:  # all three are updated together
            return
        for kind in ("recon", "sparsity", "energy"):
            metric = getattr(self, f"{stage}_{kind}")
            values.update({f"{stage}/{k}": v for k, v in metric.compute().items()})
            metric.reset()
        prog = {f"{stage}/psnr"} if stage == "val" else set()
        for name, value in values.items():
            self.log(name, value, prog_bar=name in prog, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        usage = self.usage_epoch
        if self.trainer.world_size > 1:
            usage = self.trainer.strategy.reduce(usage.clone(), reduce_op="sum")
        share = usage / usage.sum().clamp_min(1.0)
        height, width = getattr(self, "_image_size", (32, 32))
        metrics = {"train/atoms_used": float(used_atoms(usage)),
                   "train/lipschitz": float(self.dictionary.operator_norm(height, width)),
                   "train/atoms_resampled": float(self.resampled_total)}
        metrics.update({f"atom_usage/{i:02d}": float(v) for i, v in enumerate(share.tolist())})
        for name, value in metrics.items():
            self.log(name, value, on_step=False, on_epoch=True, rank_zero_only=True)
        self.usage_epoch.zero_()
        if self.trainer.is_global_zero and self.log_images_every_n_epochs > 0:
            log_image(self.loggers, "atoms_by_epoch", atom_grid(self.dictionary.weight), self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self._preview = None

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

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = self.dictionary.parameters()
        factory = self.optimizer_factory
        if isinstance(factory, str):
            if factory.lower() == "sgd":
                opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
            else:
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
        total = self._total_steps
        if not total:
            return 1.0
        floor = self.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def on_train_start(self) -> None:
        # The run's length in optimiser steps, known once the loaders exist (asking Lightning for
        # estimated_stepping_batches inside configure_optimizers would build the training loader
        # before a resumed checkpoint restores its mid-epoch position).
        trainer = self.trainer
        per_epoch = trainer.num_training_batches
        total = None
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(per_epoch):
            total = trainer.max_epochs * math.ceil(per_epoch / max(1, trainer.accumulate_grad_batches))
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = trainer.max_steps if total is None else min(total, trainer.max_steps)
        self._total_steps = total
