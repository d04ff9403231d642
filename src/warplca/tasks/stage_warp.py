"""Stage "warp": train WARP-CNN on the cached targets and save the WARP-LCA bundle ``warp_lca.pt``.

Reads the ``targets`` stage's caches (refused, naming the differing keys, when they no longer match
the config), builds the predictor from the ``predictor`` group, the loss from the ``loss`` group and
:class:`~warplca.modules.warp_regression.WarpRegression` from ``model.warp`` (its keys other than
``batch_size``, ``num_workers``, ``epochs`` and ``trainer`` are the module's arguments), fits it with
the run's Trainer (resuming ``checkpoints/warp/last.ckpt`` unless ``resume=false`` or ``force=true``)
and writes the bundle (dictionary, predictor, LCA settings, normalisation) atomically on rank 0.

With ``model.warp.finetune.epochs`` > 0 the regression is followed by the energy fine-tune: the trained
predictor trains that many more epochs (AdamW at ``finetune.lr``, cosine) on its loss plus
``finetune.energy_weight`` · the LCA energy of its predicted states, as a Trainer of its own
(``checkpoints/warp_finetune/``, logged as ``warp_finetune``); the bundle holds the fine-tuned predictor.
"""

from __future__ import annotations

import logging
from typing import Any

from warplca.data.target_cache import TargetDataModule
from warplca.tasks import stage_targets
from warplca.tasks.context import RunContext
from warplca.tasks.predictor_fit import build_module, target_sets, warp_data_settings

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run"]

ARTIFACT = "warp_lca.pt"


def run(ctx: RunContext) -> dict[str, float]:
    tconf = stage_targets.settings(ctx)
    dictionary = ctx.dictionary()
    lca = ctx.lca(dictionary)
    norm = ctx.normalization()
    dm = ctx.datamodule

    sets = target_sets(ctx, dictionary, lca, norm)
    _, data = warp_data_settings(ctx)
    module, n_params = build_module(ctx, dictionary, lca, norm)
    predictor = module.predictor
    datamodule = TargetDataModule(sets["train"], sets.get("val"), batch_size=int(data["batch_size"]),
                                  num_workers=int(data["num_workers"]),
                                  seed=int(ctx.cfg.get("seed") or 0))

    overrides: dict[str, Any] = {}
    if "val" not in sets:
        overrides.update(limit_val_batches=0, num_sanity_val_steps=0)
    trainer = ctx.trainer("warp", **overrides)
    ckpt = ctx.resume_checkpoint("warp")
    log.info("warp: training %s (%d parameters) on %d cached targets", type(predictor).__name__, n_params,
             len(sets["train"]))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt is not None else None)
    epochs = int(trainer.current_epoch)
    finetune = data["finetune"]
    if int(finetune["epochs"]) > 0:
        tuned, _ = build_module(ctx, dictionary, lca, norm, module_overrides={
            "energy_weight": float(finetune["energy_weight"]), "lr": float(finetune["lr"])})
        tuned.predictor.load_state_dict(module.predictor.state_dict())
        module = tuned
        trainer = ctx.trainer("warp_finetune", max_epochs=int(finetune["epochs"]), **overrides)
        log.info("warp: energy fine-tune, %d epochs at weight %g", int(finetune["epochs"]),
                 float(finetune["energy_weight"]))
        ckpt = ctx.resume_checkpoint("warp_finetune")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt is not None else None)
        epochs += int(trainer.current_epoch)

    metrics: dict[str, float] = {"predictor_params": float(n_params)}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(("val/", "train/loss", "train/energy")) and not name.endswith(("_step", "_epoch")):
            metrics[name] = float(value)
    if ctx.is_rank_zero:
        bundle = module.bundle()
        bundle.save(ctx.artifact(ARTIFACT), target_iters=int(tconf["iters"]),
                    target_solver=stage_targets.solver_spec(tconf),
                    dataset=str(getattr(dm, "name", "")), predictor_params=n_params,
                    epochs=epochs,
                    metrics={k: v for k, v in metrics.items() if k.startswith("val/")})
        log.info("warp: saved %s", ctx.artifact(ARTIFACT))
    ctx.barrier()
    return metrics
