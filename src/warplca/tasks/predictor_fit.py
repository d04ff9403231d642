"""Building and fitting WARP-CNN regressions on a run's state-target caches.

The ``warp`` stage and the study variants both go through :func:`target_sets` and :func:`build_module`,
so a variant differs from the main predictor only in what it overrides; variants are fitted quietly
(:func:`fit_quietly`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Subset

from warplca.bundle import DEFAULT_PREDICTOR
from warplca.data.target_cache import TargetCache, TargetDataModule, TargetDataset
from warplca.lca import ConvDictionary
from warplca.losses import LossSettings
from warplca.modules.warp_regression import WarpRegression
from warplca.settings import Annotated, Checked, Doc, Ge, Gt, build, declared, path_of
from warplca.tasks import stage_targets
from warplca.tasks.context import RunContext
from warplca.tasks.utils import to_container

__all__ = ["INPUTS", "PIPELINE_KEYS", "WarpStageSettings", "build_module", "build_predictor", "fit_quietly",
           "loss_config", "target_sets", "warp_data_settings"]

#: WarpRegression arguments the pipeline passes itself, and where each one is configured instead
PIPELINE_KEYS: dict[str, str] = {
    "predictor": "the predictor is chosen with the top-level predictor group, e.g. predictor=medium "
                 "(its keys: predictor.width=64, …)",
    "loss": "the loss is chosen with the top-level loss group, e.g. loss=mse",
    "gamma": "the Laplacian scale γ is set with loss.gamma=<γ> (with loss=laplacian)",
    "dictionary": "the dictionary comes from the run (the dictionary stage, or dictionary_path=<file>)",
    "lca_settings": "the LCA settings are the top-level lca group (lca.lam=…, lca.threshold=…)",
    "normalization": "the normalisation is the top-level norm group (norm=<kind>)",
    "dictionary_fingerprint": "it is recorded from the run's dictionary",
}
#: ablation input name (``study.ablation.inputs``) -> WarpCNN overrides
INPUTS: dict[str, dict[str, Any]] = {
    "image": {"use_drive": False},
    "image+drive": {"use_drive": True, "drive_mode": "concat"},
    "drive+residual": {"use_drive": True, "drive_mode": "residual"},
}


def build_predictor(ctx: RunContext, dictionary: ConvDictionary,
                    overrides: Mapping[str, Any] | None = None) -> Any:
    """The ``predictor`` group's network (with ``overrides``), sized for ``dictionary``.

    ``drive_scale: auto`` becomes 1/‖Φ‖²_op (on 64×64 images), so the residual drive is the state after
    one cold LCA step with τ = auto (exactly so where L does not depend on the image size).
    """
    if ctx.cfg.get("predictor") is None:
        raise ValueError("no predictor config: choose one with predictor=small|medium|large")
    conf = {"_target_": DEFAULT_PREDICTOR, **to_container(ctx.cfg.predictor), **dict(overrides or {})}
    if conf.get("drive_scale") == "auto" and conf.get("use_drive"):
        conf["drive_scale"] = 1.0 / max(dictionary.operator_norm(), 1.0)
    return instantiate(OmegaConf.create(conf), in_channels=dictionary.in_channels, n_atoms=dictionary.n_atoms,
                       stride=dictionary.stride)


@dataclass(frozen=True)
class FinetuneSettings(Checked):
    """``model.warp.finetune``: the energy fine-tune after the regression."""

    epochs: Annotated[int, Ge(0), Doc("0: no fine-tune")] = 10
    lr: Annotated[float, Gt(0)] = 0.0003
    energy_weight: Annotated[float, Ge(0), Doc("w of the energy term")] = 0.001


@dataclass(frozen=True)
class WarpStageSettings(Checked):
    """The keys of ``model.warp`` that the warp stage reads itself (the rest are WarpRegression's)."""

    batch_size: Annotated[int, Ge(1), Doc("per process; the global batch is × devices × nodes")] = 64
    num_workers: Annotated[int, Ge(0)] = 0
    epochs: Annotated[int, Ge(1), Doc("of the regression")] = 40
    finetune: FinetuneSettings = FinetuneSettings()


def loss_config(ctx: RunContext) -> dict[str, Any]:
    """``loss`` / ``gamma`` of WarpRegression from the ``loss`` group."""
    conf = build(LossSettings, to_container(ctx.cfg.get("loss")), "loss")
    return {"loss": conf.name, "gamma": conf.gamma}


def warp_data_settings(ctx: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.warp`` split into (WarpRegression arguments, :class:`WarpStageSettings` as a dict)."""
    node = to_container(ctx.stage_config("warp")) or {}
    stage = {k: node.pop(k) for k in declared(WarpStageSettings) if k in node}
    node.setdefault("_target_", path_of(WarpRegression))
    return node, asdict(build(WarpStageSettings, stage, "model.warp"))


def target_sets(ctx: RunContext, dictionary: ConvDictionary, lca: Any, normalization: Any,
                splits: tuple[str, ...] = ("train", "val")) -> dict[str, TargetDataset]:
    """(image, state) datasets of the ``targets`` stage's caches, refused when they no longer match."""
    tconf = stage_targets.settings(ctx)
    sets: dict[str, TargetDataset] = {}
    for split in [s for s in splits if s in tconf["splits"]]:
        manifest = stage_targets.expected(ctx, split, dictionary, lca, normalization, tconf)
        try:
            cache = TargetCache.open(stage_targets.cache_dir(ctx, split), manifest)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}: run the targets stage first (stages=[targets,warp])") from exc
        sets[split] = TargetDataset(cache, ctx.datamodule.split_dataset(split))
    return sets  # the config validation refuses targets.splits without train


def build_module(ctx: RunContext, dictionary: ConvDictionary, lca: Any, normalization: Any,
                 predictor_overrides: Mapping[str, Any] | None = None,
                 module_overrides: Mapping[str, Any] | None = None,
                 init: nn.Module | None = None) -> tuple[pl.LightningModule, int]:
    """The run's WarpRegression (``model.warp``, ``predictor``, ``loss``) with the given overrides
    (``module_overrides``: WarpRegression arguments), its predictor starting from ``init``'s weights when
    given (a fine-tune), and the predictor's parameter count."""
    node, _ = warp_data_settings(ctx)
    predictor = build_predictor(ctx, dictionary, predictor_overrides)
    if init is not None:
        predictor.load_state_dict(init.state_dict())
    n_params = sum(p.numel() for p in predictor.parameters())
    node.update({**loss_config(ctx), **dict(module_overrides or {})})
    return instantiate(OmegaConf.create(node), _convert_="all", predictor=predictor, dictionary=dictionary,
                       lca_settings=lca.settings(), normalization=normalization), n_params


def fit_quietly(ctx: RunContext, module: pl.LightningModule, train: TargetDataset, epochs: int,
                limit: int | None = None, steps: int | None = None,
                seed: int | None = None) -> pl.LightningModule:
    """Fit ``module`` on the first ``limit`` items of ``train`` for ``epochs`` epochs — or exactly ``steps``
    optimiser steps, whatever the data size (cosine over the steps) — on one device, with the warp
    stage's trainer settings (``model.warp.trainer``, then the ``trainer`` group: gradient clipping,
    precision, …) but no checkpoints, loggers, progress bars or validation; the data order is seeded
    like the warp stage's (or by ``seed``)."""
    _, data = warp_data_settings(ctx)
    seed = int(ctx.cfg.get("seed") or 0) if seed is None else int(seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    dataset: Any = Subset(train, range(int(limit))) if limit is not None and limit < len(train) else train
    datamodule = TargetDataModule(dataset, None, batch_size=int(data["batch_size"]),
                                  num_workers=int(data["num_workers"]), seed=seed)
    length = {"max_epochs": int(epochs)} if steps is None else {"max_epochs": -1, "max_steps": int(steps)}
    kwargs = ctx.trainer_kwargs("warp", devices=1, logger=False, **length,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    for key in ("_target_", "strategy", "num_nodes", "callbacks"):  # one quiet process, nothing saved
        kwargs.pop(key, None)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, datamodule=datamodule)
    return module
