"""Hydra entry points ``warplca-train`` / ``warplca-eval`` (``train.py`` / ``evaluate.py`` wrap them). The
config path is absolute, so they work from any directory; Hydra does not chdir (relative paths stay so)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

# at module level: warplca.tasks.utils registers the resolver Hydra's job-logging config needs
from warplca.tasks.evaluate import evaluate
from warplca.tasks.train import train
from warplca.tasks.utils import default_config_dir, get_metric_value

_CONF = str(default_config_dir())

__all__ = ["eval_main", "train_main"]


@hydra.main(version_base="1.3", config_path=_CONF, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """Run the training pipeline (:func:`warplca.tasks.train.train`); returns ``optimized_metric``."""
    metrics = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=_CONF, config_name="eval")
def eval_main(cfg: DictConfig) -> dict[str, float]:
    """Evaluate runs / summarise sweeps (:func:`warplca.tasks.evaluate.evaluate`)."""
    return evaluate(cfg)
