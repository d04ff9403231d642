"""Evaluate warp-lca runs: ``python evaluate.py run_dir=<dir> [eval=convergence|thresholds|denoise|ood|all]``.

A thin Hydra entry point; the work happens in :func:`warplca.tasks.evaluate.evaluate`. Also
``python evaluate.py sweep_dir=<multirun dir>`` (sweep summary) and ``results_md=docs/results.md``
(README results page). See ``conf/eval.yaml`` for every option.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from warplca.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    return evaluate(cfg)


if __name__ == "__main__":
    main()
