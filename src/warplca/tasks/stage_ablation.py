"""Stage "ablation": which loss and which input give the best warm start.

Trains one WARP-CNN per (loss, input) pair of ``study.ablation`` — inputs ``image`` / ``image+drive``
(Φᵀx concatenated) / ``drive+residual`` (û = Φᵀx + f(x)) — with the warp stage's regression settings
otherwise (no energy fine-tune), scores each (:mod:`warplca.tasks.study`) and writes ``ablation.md`` /
``.png`` / ``.csv`` (the artifact).
"""

from __future__ import annotations

import functools

from warplca.evaluation.warm_start_study import plot_variant_scores
from warplca.tasks.context import RunContext
from warplca.tasks.study import INPUTS, Study

__all__ = ["ARTIFACT", "run"]

ARTIFACT = "ablation.csv"


def run(ctx: RunContext) -> dict[str, float]:
    """Train and score every (loss, input) variant; write the section, plot and table."""
    study = Study.for_stage(ctx, "ablation")
    if study is None:
        return {}
    conf = study.conf
    epochs = study.epochs()
    rows = []
    for loss in conf["losses"]:
        for inp in conf["inputs"]:
            key = {"variant": f"{loss} / {inp}", "loss": str(loss), "input": str(inp)}
            rows.append(study.variant(key, epochs, predictor_overrides=INPUTS[inp],
                                      module_overrides={"loss": str(loss)}))
    what = (f"Each variant trains the run's predictor for {epochs} epochs with one loss and one input "
            "(everything else as in the warp stage's regression, without its energy fine-tune; the same "
            "initial weights and data order).")
    plot = functools.partial(plot_variant_scores, title="WARP-CNN ablation: loss × input")
    return study.publish("Ablation: loss × input", what, rows, ["variant"], plot)
