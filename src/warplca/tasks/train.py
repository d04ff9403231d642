"""The training task: validate the config, seed, and run the requested pipeline stages.

``train(cfg)`` is what ``python train.py`` calls; tests and notebooks call it on a composed config
(:func:`warplca.config.compose_config`).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.tasks.context import RunContext, RunSettings
from warplca.tasks.stages import run_stages
from warplca.tasks.utils import seed_everything, task_wrapper

log = logging.getLogger(__name__)

__all__ = ["print_metrics", "train"]


def print_metrics(metrics: dict[str, float], run_dir: Any) -> None:
    """The end-of-run console table (stage, metric, value)."""
    if not metrics:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"metrics ({run_dir}/metrics.json)")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        stage, _, key = name.partition("/")
        table.add_row(stage, key, f"{metrics[name]:.4g}")
    Console().print(table)


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.stages`` in the run directory; returns every metric of the run (flat ``stage/key``)."""
    from warplca.config import validate_train_config

    validate_train_config(cfg)  # every problem of every group at once, each named by its key
    seed_everything(cfg.get("seed"))
    ctx = RunContext.from_config(cfg)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", ctx.run_dir)
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    metrics = run_stages(ctx, cfg.get("stages"))
    # The report stage prints the cold-vs-warm table itself: it stays the last thing on the console.
    wanted = cfg.get("print_metrics", RunSettings.print_metrics)
    if ctx.is_rank_zero and wanted and "report" not in list(cfg.get("stages") or []):
        print_metrics(metrics, ctx.run_dir)
    return metrics
