"""The paper's experiments as reports (README, "Experiments and reports"): one module per experiment.

- :mod:`~warplca.evaluation.convergence` — cold LCA vs WARP-LCA against iterations, timing,
  iterations-to-match (the main job's closing table).
- :mod:`~warplca.evaluation.thresholds` — the same for soft / cel0 / half, each with its own WARP-CNN.
- :mod:`~warplca.evaluation.denoise` — Gaussian noise σ ∈ {0.05, 0.1, 0.2}: PSNR/SSIM vs the clean image.
- :mod:`~warplca.evaluation.ood` — a bundle applied to other datasets and larger images.
- :mod:`~warplca.evaluation.robustness` — the noisy-classification table (written by the classify stage).
- :mod:`~warplca.evaluation.sweep` — Hydra multirun directories -> one table + one plot per parameter.
- :mod:`~warplca.evaluation.examples` — example reconstructions, code-energy maps, atom grids.
- :mod:`~warplca.evaluation.report` — metrics.json merging, CSV, report.md sections, logger output,
  the README results page.
- :mod:`~warplca.evaluation.experiments` — the ``eval`` settings (YAML defaults), the evaluation images,
  the convergence run and the robustness section, shared by ``evaluate.py`` and the pipeline's stages.

``python evaluate.py`` (:func:`warplca.tasks.evaluate.evaluate`) drives them from the ``eval`` config;
modules are imported on use, so importing this package is cheap.
"""

__all__ = [
    "common",
    "convergence",
    "denoise",
    "examples",
    "experiments",
    "ood",
    "report",
    "robustness",
    "sweep",
    "thresholds",
]
