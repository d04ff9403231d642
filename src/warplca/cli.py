"""Hydra entry points ``warplca-train`` / ``warplca-eval`` (``train.py`` / ``evaluate.py`` wrap them). The
config path is absolute, so they work from any directory; Hydra does not chdir (relative paths stay so).

The task functions (:func:`train_task`, :func:`eval_task`) are module attributes of their own, so a launcher
that pickles the task (``hydra/launcher=slurm``) pickles a reference to this module: the job process
imports it and so registers the config bases and resolvers below before Hydra composes its config.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from warplca.config import default_config_dir, register_bases
from warplca.tasks.evaluate import evaluate
from warplca.tasks.train import train
from warplca.tasks.utils import get_metric_value, hydra_entry_point, register_resolvers

_CONF = str(default_config_dir())
register_bases()  # the group bases built from the declarations
register_resolvers()  # ${warplca.rank_suffix:} in hydra/default.yaml's job-log file name

__all__ = ["eval_main", "eval_task", "train_main", "train_task"]


def train_task(cfg: DictConfig) -> float | None:
    """Run the training pipeline (:func:`warplca.tasks.train.train`); returns ``optimized_metric``."""
    with hydra_entry_point():
        metrics = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


def eval_task(cfg: DictConfig) -> dict[str, float]:
    """Evaluate runs / summarise sweeps (:func:`warplca.tasks.evaluate.evaluate`)."""
    with hydra_entry_point():
        return evaluate(cfg)


train_main = hydra.main(version_base="1.3", config_path=_CONF, config_name="train")(train_task)
eval_main = hydra.main(version_base="1.3", config_path=_CONF, config_name="eval")(eval_task)
