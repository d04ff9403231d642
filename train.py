"""Train warp-lca: ``python train.py [stages=[...]] [group=option ...] [key=value ...]``.

A thin Hydra entry point; the work happens in :func:`warplca.tasks.train.train`. Returns the
metric named by ``optimized_metric`` (for Hydra sweepers) when one is set.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from warplca.tasks.train import train
from warplca.tasks.utils import get_metric_value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
