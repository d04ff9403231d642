"""Stage "learning_curve": how the warm start improves with training-set size and epochs.

Trains the run's predictor afresh on the first n cached targets for e epochs, for every n in
``study.learning_curve.sizes`` (clipped to the cache) and e in ``study.learning_curve.epochs``, scores
each (:mod:`warplca.tasks.study`) and writes ``learning_curve.md`` / ``.png`` / ``.csv`` (the artifact).
"""

from __future__ import annotations

import logging

from warplca.evaluation.warm_start_study import plot_learning_curve
from warplca.tasks.context import RunContext
from warplca.tasks.study import Study

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run"]

ARTIFACT = "learning_curve.csv"


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
    rows = []
    for size in sizes:
        for epochs in epochs_list:
            key = {"variant": f"n={size}, {epochs} ep", "train_size": size, "epochs": epochs}
            rows.append(study.variant(key, epochs, limit=size))
    what = ("Each point trains the run's predictor afresh on the first n cached targets for e epochs "
            "(everything else as in the warp stage's regression, without its energy fine-tune).")
    return study.publish("Learning curve: training-set size × epochs", what, rows, ["train_size", "epochs"],
                         plot_learning_curve)
