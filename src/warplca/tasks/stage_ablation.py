"""Stage "ablation": which loss and which input give the best warm start.

Trains one WARP-CNN per (loss, input) pair of ``study.ablation`` — losses ``laplacian`` / ``mse`` /
``l1``, inputs ``image`` / ``image+drive`` (Φᵀx concatenated) / ``drive+residual`` (û = Φᵀx + f(x)) —
on the run's cached targets with the warp stage's settings otherwise (predictor size, epochs, lr,
data order, initial weights), and scores each by iterations-to-match and final energy
(:mod:`warplca.tasks.study`). Writes ``ablation.md`` / ``ablation.png`` / ``ablation.csv`` (the
artifact); the report stage adds the section to ``report.md``.
"""

from __future__ import annotations

from warplca.evaluation.warm_start_study import plot_ablation
from warplca.tasks.context import RunContext
from warplca.tasks.study import INPUTS, Study

__all__ = ["ARTIFACT", "run"]

ARTIFACT = "ablation.csv"


def run(ctx: RunContext) -> dict[str, float]:
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
    cold = {"variant": "cold LCA", "loss": "—", "input": "—", **study.cold_scores}
    what = (f"Each variant trains the run's predictor for {epochs} epochs with one loss and one input "
            "(everything else as in the warp stage, the same initial weights and data order).")
    return study.publish("Ablation: loss × input", what, rows, cold, ["variant"],
                         lambda p: plot_ablation(rows, cold, study.total, study.early, p))
