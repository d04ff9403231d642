"""Stage "warp": train WARP-CNN on the cached targets and save the WARP-LCA bundle ``warp_lca.pt``.

Fits :class:`~warplca.modules.warp_regression.WarpRegression` (``model.warp``, ``predictor``, ``loss``)
with the run's Trainer (resumable) on the ``targets`` caches. With ``model.warp.finetune.epochs`` > 0
an energy fine-tune follows (loss + ``finetune.energy_weight`` · LCA energy, at ``finetune.lr``) as
stage ``warp_finetune``; the bundle holds the final predictor.
"""

from __future__ import annotations

import logging
from typing import Any

from warplca.data.target_cache import TargetDataModule
from warplca.serialization import BUNDLE_FILE
from warplca.tasks import stage_targets
from warplca.tasks.context import RunContext
from warplca.tasks.predictor_fit import build_module, target_sets, warp_data_settings

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run"]

ARTIFACT = BUNDLE_FILE


def run(ctx: RunContext) -> dict[str, float]:
    """Train (and fine-tune) the predictor, save the bundle; metrics: val/train losses, parameters."""
    tconf = stage_targets.settings(ctx)
    dictionary, lca, norm = ctx.coding()
    sets = target_sets(ctx, dictionary, lca, norm)
    _, data = warp_data_settings(ctx)
    module, n_params = build_module(ctx, dictionary, lca, norm)
    datamodule = TargetDataModule(sets["train"], sets.get("val"), batch_size=int(data["batch_size"]),
                                  num_workers=int(data["num_workers"]), seed=int(ctx.cfg.get("seed") or 0))

    overrides: dict[str, Any] = {} if "val" in sets else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    trainer = ctx.trainer("warp", **overrides)
    ckpt = ctx.resume_checkpoint("warp")
    log.info("warp: training %s (%d parameters) on %d cached targets", type(module.predictor).__name__,
             n_params, len(sets["train"]))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    epochs = int(trainer.current_epoch)
    finetune = data["finetune"]
    if int(finetune["epochs"]) > 0:
        energy = {"energy_weight": float(finetune["energy_weight"]), "lr": float(finetune["lr"])}
        tuned, _ = build_module(ctx, dictionary, lca, norm, module_overrides=energy, init=module.predictor)
        tuned.cold_values = module.cold_values  # same dictionary, LCA and val images: cold LCA once
        module = tuned
        trainer = ctx.trainer("warp", name="warp_finetune", defaults={"max_epochs": int(finetune["epochs"])},
                              **overrides)
        log.info("warp: energy fine-tune, %d epochs at weight %g", int(finetune["epochs"]),
                 float(finetune["energy_weight"]))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.resume_checkpoint("warp_finetune"))
        epochs += int(trainer.current_epoch)

    metrics: dict[str, float] = {"predictor_params": float(n_params)}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(("val/", "train/loss", "train/energy")) and not name.endswith(("_step", "_epoch")):
            metrics[name] = float(value)
    if ctx.is_rank_zero:
        module.bundle().save(ctx.artifact(ARTIFACT), target_iters=int(tconf["iters"]),
                             target_solver=stage_targets.solver_spec(tconf), epochs=epochs,
                             dataset=str(getattr(ctx.datamodule, "name", "")), predictor_params=n_params,
                             metrics={k: v for k, v in metrics.items() if k.startswith("val/")})
        log.info("warp: saved %s", ctx.artifact(ARTIFACT))
    ctx.barrier()
    return metrics
