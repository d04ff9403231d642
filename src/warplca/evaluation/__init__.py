"""The paper's experiments as reports (README, "Experiments and reports"): measure, then render.

Each experiment module measures and returns an :class:`~warplca.evaluation.common.ExperimentResult`
(rows, metrics, figure specs, its report section) without writing anything;
:func:`warplca.evaluation.report.write_result` writes every result the same way (CSV, PNG, report.md,
metrics.json, loggers).

- :mod:`~warplca.evaluation.curves` — the traced cold / warm runs, iterations-to-match, equal-energy speed-up.
- :mod:`~warplca.evaluation.convergence` — cold LCA vs WARP-LCA against iterations, timing (the main
  job's closing table).
- :mod:`~warplca.evaluation.thresholds` — the same for soft / cel0 / half, each with its own WARP-CNN.
- :mod:`~warplca.evaluation.denoise` — Gaussian noise σ ∈ {0.05, 0.1, 0.2}: PSNR/SSIM vs the clean image.
- :mod:`~warplca.evaluation.ood` — a bundle applied to other datasets and larger images.
- :mod:`~warplca.evaluation.robustness` — the noisy-classification table (written by the classify stage).
- :mod:`~warplca.evaluation.sweep` — Hydra multirun directories -> one table + one plot per parameter.
- :mod:`~warplca.evaluation.plots`, :mod:`~warplca.evaluation.examples` — the figures.
- :mod:`~warplca.evaluation.report` — the writer: metrics.json merging, CSV, report.md sections, logger
  output, the README results page.
- :mod:`~warplca.evaluation.experiments` — the ``eval`` settings (YAML defaults), the evaluation images
  and the convergence run, shared by ``evaluate.py`` and the pipeline's stages.
- :mod:`~warplca.evaluation.warm_start_study` — scoring of the ablation and learning-curve variants.

``python evaluate.py`` (:func:`warplca.tasks.evaluate.evaluate`) drives them from the ``eval`` config;
modules are imported on use, so importing this package is cheap.
"""

__all__ = [
    "common", "convergence", "curves", "denoise", "examples", "experiments", "ood", "plots", "report",
    "robustness", "sweep", "thresholds", "warm_start_study",
]
