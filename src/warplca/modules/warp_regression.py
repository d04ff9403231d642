"""``WarpRegression``: train WARP-CNN to regress cold-LCA target states (the ``warp`` stage's module). The
loss (:mod:`warplca.losses`) compares û = f_θ(x) with the targets u* of a target cache, plus w · the mean LCA
energy E(T_λ(û)) with ``energy_weight`` w > 0."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, R2Score

from warplca.bundle import WarpLCA, predictor_hparams, rebuild_predictor
from warplca.data.normalization import Normalization
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA, LCAResult
from warplca.losses import LOSSES, build_loss, coding_energy
from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.settings import Annotated, Doc, Ge, Gt, NonEmpty, OneOf, checked

__all__ = ["WarpRegression"]


class WarpRegression(pl.LightningModule):
    """WARP-CNN state regression against cached cold-LCA targets.

    Validation logs state MSE / R² and, per k in ``eval_iters``, energy, PSNR, SSIM and sparsity after
    k LCA steps from û (``val/warm_k{k}/…``) and from 0 (``val/cold_k{k}/…``, computed once and kept in
    checkpoints) plus ``val/energy_ratio_k{k}`` = warm / cold energy.

    Args:
        predictor: the state predictor (:class:`~warplca.models.WarpCNN`); the only trained part.
        dictionary: the fixed dictionary the targets were computed with (frozen here).
        lca_settings: :meth:`LCA.settings` of those targets (threshold, λ, τ, …), also used by validation.
        normalization: [0, 1] pixels ↔ coded space (a :class:`Normalization` or its ``to_dict()``).
        loss: ``laplacian`` | ``mse`` | ``l1``; ``gamma`` is the Laplacian scale γ (weights exp(|u*|/(γλ))).
        lr, weight_decay: AdamW settings; ``scheduler``: ``cosine`` (over ``max_epochs``) or None.
        eval_iters: LCA budgets k of the validation (runs are chained: max(eval_iters) steps per batch).
        lca_eval_every_n_epochs: run those comparisons every n-th and the last validation epoch.
        energy_weight: w of the energy term (0: regression only); ``energy_temperature``: t/λ of its
            straight-through gradient for the hard threshold.

    ``predictor`` and ``dictionary`` may be plain dicts (``WarpCNN.config()``, ``ConvDictionary.config()``),
    as ``load_from_checkpoint`` passes them; the weights then come from the checkpoint.
    ``dictionary_fingerprint`` (computed when ``dictionary`` is a module) names the targets' dictionary.
    """

    @checked
    def __init__(self, predictor: nn.Module | Mapping[str, Any],
                 dictionary: ConvDictionary | Mapping[str, Any], lca_settings: Mapping[str, Any],
                 normalization: Normalization | Mapping[str, Any] | None = None,
                 loss: Annotated[str, OneOf(LOSSES, "loss")] = "laplacian",
                 gamma: Annotated[float | None, Gt(0), Doc("the Laplacian scale γ")] = 3.0,
                 lr: Annotated[float, Gt(0), Doc("AdamW")] = 3e-3,
                 weight_decay: Annotated[float, Ge(0)] = 0.0,
                 eval_iters: Annotated[Sequence[int], Ge(0), NonEmpty(), Doc("LCA budgets k of validation")
                                       ] = (0, 10, 100),
                 scheduler: Literal["cosine", "none"] | None = "cosine",
                 lca_eval_every_n_epochs: Annotated[int, Ge(1)] = 5,
                 energy_weight: Annotated[float, Ge(0), Doc("w of the energy term")] = 0.0,
                 energy_temperature: Annotated[float, Gt(0)] = 0.1,
                 dictionary_fingerprint: str | None = None) -> None:
        super().__init__()
        if isinstance(predictor, Mapping):  # from a checkpoint: only allowlisted classes are rebuilt
            predictor = rebuild_predictor(predictor)
        if isinstance(dictionary, Mapping):  # its weights load afterwards: keep the fingerprint given
            dictionary = ConvDictionary(**dictionary)
        else:
            given, dictionary_fingerprint = dictionary_fingerprint, dictionary.fingerprint()
            if given not in (None, dictionary_fingerprint):
                raise ValueError(f"dictionary fingerprint {dictionary_fingerprint} is not the given {given}")
        if isinstance(normalization, Mapping):
            normalization = Normalization.from_dict(normalization)
        iters = sorted({int(k) for k in eval_iters})
        self.predictor = predictor
        self.dictionary = dictionary.requires_grad_(False)
        self.lca = LCA(self.dictionary, **dict(lca_settings))
        self.normalization = normalization
        self.gamma = 3.0 if gamma is None else float(gamma)
        self.loss_fn = build_loss(loss, lam=self.lca.lam, gamma=self.gamma)
        self.lr, self.weight_decay, self.scheduler = float(lr), float(weight_decay), scheduler
        self.eval_iters = iters
        self.lca_eval_every_n_epochs = int(lca_eval_every_n_epochs)
        self.energy_weight, self.energy_temperature = float(energy_weight), float(energy_temperature)
        config = predictor_hparams(predictor)  # {"_target_": class path, **config()}
        plain = ("gamma", "lr", "weight_decay", "eval_iters", "scheduler", "lca_eval_every_n_epochs",
                 "energy_weight", "energy_temperature")
        self.save_hyperparameters({
            "predictor": config, "dictionary": dictionary.config(),
            "dictionary_fingerprint": dictionary_fingerprint, "lca_settings": self.lca.settings(),
            "normalization": None if normalization is None else normalization.to_dict(), "loss": loss,
            **{name: getattr(self, name) for name in plain}})
        self.val_state_mse = MeanSquaredError()
        self.val_state_r2 = R2Score()
        self.val_lca = nn.ModuleDict({
            f"{start}_k{k}": nn.ModuleDict({"energy": EnergyMetric(), "sparsity": SparsityMetric(),
                                            "recon": reconstruction_metrics()})
            for start in ("warm", "cold") for k in iters
        })
        #: cold-start validation numbers, computed once (the validation set is fixed)
        self.cold_values: dict[str, float] | None = None
        # shares the modules, kept out of the module tree so checkpoints keep their keys
        self.__dict__["_coder"] = WarpLCA(self.dictionary, self.predictor, self.lca, self.normalization,
                                          start_guard=False)

    @property
    def coder(self) -> WarpLCA:
        """This module's parts as a live, unguarded WARP-LCA (validation measures the raw prediction)."""
        return self.__dict__["_coder"]

    def forward(self, x: Tensor) -> Tensor:
        """Predicted states for images ``x`` in the coded space (the drive Φᵀx carries no gradient)."""
        return self.coder.predict_states(x, grad=True)

    def bundle(self) -> WarpLCA:
        """The trained WARP-LCA (a copy: dictionary, predictor, LCA settings, normalisation)."""
        dictionary = copy.deepcopy(self.dictionary).cpu()
        predictor = copy.deepcopy(self.predictor).cpu()
        return WarpLCA(dictionary, predictor, LCA(dictionary, **self.lca.settings()), self.normalization)

    def _batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        states = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) and batch[1].dim() == 4 else None
        return batch[0], states

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, states = self._batch(batch)
        if states is None:
            raise ValueError("WarpRegression trains on (images, target states) batches from a TargetDataset")
        x = self.coder.preprocess(images)
        pred = self(x)
        loss = self.loss_fn(pred.float(), states.float())
        if self.energy_weight > 0:
            energy = coding_energy(x, pred, self.dictionary, self.lca.threshold, self.energy_temperature)
            energy = energy.mean()
            self.log("train/energy", energy, on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=images.shape[0])
            loss = loss + self.energy_weight * energy
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.predictor.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        steps = self.trainer.max_steps if self._trainer is not None else -1
        if self.scheduler == "cosine" and steps is not None and steps > 0:  # a fixed number of steps
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.scheduler == "cosine" and epochs is not None and epochs > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt

    def _lca_chain(self, x: Tensor, u0: Tensor | None, start: str, images: Tensor) -> None:
        """Run LCA through the budgets in ``eval_iters`` from ``u0`` and update that start's metrics."""
        u, done = u0, 0
        for k in self.eval_iters:
            res: LCAResult = self.lca(x, iters=k - done, u0=u)
            u, done = res.u.contiguous(), k
            m = self.val_lca[f"{start}_k{k}"]
            assert res.energy is not None
            m["energy"].update(res.energy, x[0].numel())
            m["sparsity"].update(res.a)
            m["recon"].update(self.coder.postprocess(res.recon, images), images.clamp(0.0, 1.0))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, states = self._batch(batch)
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            x = self.coder.preprocess(images)
            pred = self(x).float()
            if states is not None:
                states = states.float()
                self.val_state_mse.update(pred.flatten(), states.flatten())
                self.val_state_r2.update(pred.flatten(), states.flatten())
                self.log("val/loss", self.loss_fn(pred, states), on_epoch=True, sync_dist=True,
                         batch_size=images.shape[0])
            if not self._lca_epoch():
                return
            with torch.no_grad():
                self._lca_chain(x, pred.detach(), "warm", images)
                if self.cold_values is None:
                    self._lca_chain(x, None, "cold", images)

    def _lca_epoch(self) -> bool:
        """Whether this validation pass runs the warm/cold LCA comparisons."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return True  # trainer.validate() and the sanity check: always
        epoch = self.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return last or epoch % self.lca_eval_every_n_epochs == 0

    def _compute(self, start: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.eval_iters:
            for metric in self.val_lca[f"{start}_k{k}"].values():  # energy, sparsity, recon
                out.update({f"val/{start}_k{k}/{name}": float(v) for name, v in metric.compute().items()})
                metric.reset()
        return out

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float] = {}
        if self.val_state_mse.update_count:
            values["val/state_mse"] = float(self.val_state_mse.compute())
            values["val/state_r2"] = float(self.val_state_r2.compute())
        self.val_state_mse.reset()
        self.val_state_r2.reset()
        if self.val_lca[f"warm_k{self.eval_iters[0]}"]["energy"].update_count:  # an LCA-comparison epoch
            values.update(self._compute("warm"))
            cold = self.cold_values
            if cold is None:
                cold = self._compute("cold")
                if not self.trainer.sanity_checking:
                    self.cold_values = cold
            values.update(cold)
            for k in self.eval_iters:
                c = values.get(f"val/cold_k{k}/energy", math.nan)
                w = values.get(f"val/warm_k{k}/energy", math.nan)
                values[f"val/energy_ratio_k{k}"] = w / c if c else math.nan
        for name, value in values.items():
            self.log(name, value, prog_bar=name == f"val/energy_ratio_k{self.eval_iters[-1]}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["warp_cold_values"] = self.cold_values

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.cold_values = checkpoint.get("warp_cold_values")
