"""Hydra entry points: the ``warplca-train`` / ``warplca-eval`` commands.

``python train.py`` / ``python evaluate.py`` are thin wrappers over the same two functions. The
config tree ships inside the package (``warplca/conf``); ``config_path`` is its absolute location,
:func:`warplca.tasks.utils.default_config_dir` (a plain ``"conf"`` would make Hydra look for an
importable ``warplca.conf`` module, which needs an ``__init__.py`` there), so the commands work
from any directory and from a non-editable install. Hydra does not chdir: relative paths
(``run_dir``, the ``outputs/`` and ``multirun/`` defaults, ``data/``) are relative to the
directory the command was started in.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

# imported at module level (not inside the functions): warplca.tasks.utils registers the
# ``${warplca.rank_suffix:}`` resolver that Hydra's job-logging config needs before the task runs
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
