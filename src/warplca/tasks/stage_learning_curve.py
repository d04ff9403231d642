"""Stage "learning_curve": how the warm start improves with training-set size and epochs.

Trains the run's predictor afresh on n cached targets (nested, seeded samples stratified by photo × scale:
:func:`nested_order`) for e epochs, for every n in
``study.learning_curve.sizes`` (clipped to the cache) and e in ``study.learning_curve.epochs``, scores
each (:mod:`warplca.tasks.study`) and writes ``learning_curve.md`` / ``.png`` / ``.csv`` (the artifact).
"""

from __future__ import annotations

import logging

from torch import Tensor
from torch.utils.data import Dataset, Subset

from warplca.data.datamodule import stratified_order
from warplca.evaluation.warm_start_study import plot_learning_curve
from warplca.tasks.context import RunContext
from warplca.tasks.study import Study

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run"]

ARTIFACT = "learning_curve.csv"


def nested_order(images: Dataset, count: int, seed: int) -> Tensor:
    """A seeded order of the first ``count`` items whose every prefix is stratified by the dataset's
    ``strata`` (photo × scale for the natural crops; one stratum otherwise): the nested samples."""
    strata = getattr(images, "strata", None)
    return stratified_order(strata[:count] if strata is not None else [0] * count, seed)


def run(ctx: RunContext) -> dict[str, float]:
    """Train and score one variant per (size, epochs); write the section, plot and table."""
    study = Study.for_stage(ctx, "learning_curve")
    if study is None:
        return {}
    conf = study.conf
    n = len(study.train)
    sizes = sorted({min(int(s), n) for s in conf["sizes"] if int(s) > 0})
    epochs_list = sorted({int(e) for e in conf["epochs"] if int(e) > 0})
    if not sizes or not epochs_list:
        raise ValueError(f"study.learning_curve needs positive sizes and epochs, got {conf}")
    if max(int(s) for s in conf["sizes"]) > n:
        log.warning("learning_curve: only %d targets are cached (targets.limit); sizes clipped to %s",
                    n, sizes)
    order = nested_order(study.train.images, n, int(ctx.cfg.get("seed") or 0))
    rows = []
    for size in sizes:
        for epochs in epochs_list:
            key = {"variant": f"n={size}, {epochs} ep", "train_size": size, "epochs": epochs}
            subset = order[:size].tolist()
            rows.append(study.variant(key, epochs, train=lambda subset=subset: Subset(study.train, subset)))
    what = ("Each point trains the run's predictor afresh for e epochs on n cached targets: the first n of "
            "one seeded order stratified by photo × scale, so every size holds each (photo, scale) source "
            "in proportion and contains the smaller sizes (everything else as in the warp stage's "
            "regression, without its energy fine-tune).")
    return study.publish("Learning curve: training-set size × epochs", what, rows, ["train_size", "epochs"],
                         plot_learning_curve)
