"""Stage "levers": which change to the warm start's training pays, each scored on held-out images.

Variants: ``baseline``; one per ``study.levers.predictors`` entry; ``augment`` (plus a flipped/rotated
copy of each crop); ``self-distill`` (the baseline's warm-started states as targets); ``energy fine-tune
w=…`` (the baseline trained on loss + w · LCA energy). Writes ``levers.md`` / ``.png`` / ``.csv``.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from warplca.bundle import WarpLCA
from warplca.coder import SparseCoder, solve_targets
from warplca.data.target_store import item_image, solver_continuation
from warplca.evaluation.warm_start_study import plot_variant_scores
from warplca.lca import LCA
from warplca.tasks import stage_targets
from warplca.tasks.context import RunContext
from warplca.tasks.study import Study

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run", "symmetry"]

ARTIFACT = "levers.csv"


def symmetry(images: Tensor, index: int) -> Tensor:
    """The ``index``-th (1…7) non-identity symmetry of the square: 90°·(index mod 4), then a flip if ≥ 4."""
    out = torch.rot90(images, index % 4, dims=(-2, -1))
    return out.flip(-1) if index >= 4 else out


def _cached_pairs(study: Study) -> tuple[Tensor, Tensor]:
    """The cached training crops and their target states, as two tensors."""
    train = study.train
    images = torch.stack([item_image(train.images[i]) for i in range(len(train))])
    states = torch.stack([train.cache.read(i) for i in range(len(train))])
    return images, states


def _augmented(study: Study, pairs: tuple[Tensor, Tensor]) -> TensorDataset:
    """Cached pairs plus one transformed copy of every crop, its states from the run's target solver."""
    images, states = pairs
    log.info("levers: solving targets for %d transformed copies of the training crops", len(images))
    tconf = stage_targets.settings(study.ctx)
    continuation = solver_continuation(stage_targets.solver_spec(tconf))
    iters = int(tconf["iters"])
    coder = SparseCoder(study.dictionary, LCA(study.dictionary, **{**study.lca.settings(), "iters": iters}),
                        study.norm)
    copies = torch.cat([symmetry(x.unsqueeze(0), 1 + i % 7) for i, x in enumerate(images)])
    copy_states, _, _ = solve_targets(coder, copies, iters, continuation, int(tconf["batch_size"]))
    return TensorDataset(torch.cat([images, copies]), torch.cat([states, copy_states]))


def _self_distilled(study: Study, baseline: WarpLCA, images: Tensor) -> TensorDataset:
    """The crops with the baseline's warm-started states after the target solver's step count."""
    log.info("levers: warm-starting %d training crops for self-distillation targets", len(images))
    tconf = stage_targets.settings(study.ctx)
    with torch.no_grad():
        states, _, _ = solve_targets(baseline, images.to(study.device), int(tconf["iters"]), None,
                                     int(tconf["batch_size"]), warm=True)
    return TensorDataset(images, states.cpu())


def run(ctx: RunContext) -> dict[str, float]:
    """Train and score every lever; write the section, plot and table."""
    study = Study.for_stage(ctx, "levers")
    if study is None:
        return {}
    conf = study.conf
    epochs = study.epochs()
    rows = [study.variant({"variant": "baseline"}, epochs)]
    for name, overrides in (conf.get("predictors") or {}).items():
        rows.append(study.variant({"variant": f"predictor {name}"}, epochs,
                                  predictor_overrides=dict(overrides or {})))
    pairs = functools.cache(lambda: _cached_pairs(study))  # read once, and only if a variant trains
    if conf.get("augment"):
        rows.append(study.variant({"variant": "augment"}, epochs, train=lambda: _augmented(study, pairs())))
    if conf.get("self_distill"):
        rows.append(study.variant({"variant": "self-distill"}, epochs,
                                  train=lambda: _self_distilled(study, study.baseline(epochs), pairs()[0])))
    finetune = conf.get("energy_finetune") or {}
    for weight in finetune.get("weights") or []:
        overrides = {"energy_weight": float(weight), "lr": float(finetune["lr"])}
        rows.append(study.variant({"variant": f"energy fine-tune w={weight:g}"}, int(finetune["epochs"]),
                                  module_overrides=overrides, init=lambda: study.baseline(epochs)))
    what = (f"Each variant trains the run's predictor afresh for {epochs} epochs with one change "
            "(everything else as in the warp stage's regression, without its energy fine-tune; the same "
            "initial weights and data order).")
    if finetune.get("weights"):
        what += (f" The energy fine-tunes start from the baseline and train {int(finetune['epochs'])} more "
                 f"epochs at lr {float(finetune['lr']):g} (their train_s: the fine-tune alone).")
    title = "Levers: predictor size, augmentation, self-distillation, energy fine-tune"
    plot = functools.partial(plot_variant_scores, title="WARP-CNN levers")
    return study.publish(title, what, rows, ["variant"], plot)
