"""The paper's experiments as reports (README, "Experiments and reports"): measure, then render.

Each experiment module (convergence, thresholds, denoise, ood, robustness) returns an
:class:`~warplca.evaluation.common.ExperimentResult` and writes nothing;
:func:`warplca.evaluation.report.write_result` writes every result the same way (CSV, PNG, report.md,
metrics.json, loggers). ``python evaluate.py`` drives them; modules are imported on use.
"""

__all__ = [
    "common", "convergence", "curves", "denoise", "examples", "experiments", "ood", "plots", "report",
    "robustness", "sweep", "thresholds", "warm_start_study",
]
