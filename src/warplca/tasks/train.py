"""The training task: validate the config, seed, and run the requested pipeline stages.

``train(cfg)`` is what ``python train.py`` calls; tests and notebooks call it on a composed config
(:func:`warplca.tasks.utils.compose_config`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.lca.thresholds import get_threshold
from warplca.tasks.context import LCA_KEYS, RunContext
from warplca.tasks.stages import resolve_stages, run_stages
from warplca.tasks.utils import seed_everything, task_wrapper

log = logging.getLogger(__name__)

__all__ = ["print_metrics", "train", "validate_config"]


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on settings that would otherwise fail minutes into a run."""
    resolve_stages(cfg.get("stages"))
    lca = cfg.get("lca")
    if lca is not None:
        unknown = sorted(set(lca) - set(LCA_KEYS))
        if unknown:
            raise ValueError(f"unknown lca config keys {unknown}; known: {list(LCA_KEYS)}")
        try:
            get_threshold(lca.get("threshold", "hard"), lca.get("lam", 1.0), bool(lca.get("nonneg", False)),
                          lca.get("theta", 0.5))
        except ValueError as exc:
            raise ValueError(f"invalid lca config (lca.threshold={lca.get('threshold')}, "
                             f"lca.lam={lca.get('lam')}, lca.theta={lca.get('theta')}): {exc}") from exc
        tau = lca.get("tau", "auto")
        if not (tau == "auto" or (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0)):
            raise ValueError(f"invalid lca.tau={tau!r}: expected a number > 0 or 'auto'")
        iters = lca.get("iters", 1)
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
            raise ValueError(f"invalid lca.iters={iters!r}: expected an integer ≥ 0")
    for key in ("dictionary_path", "warp_path"):
        given = cfg.get(key)
        if given and not Path(given).expanduser().is_file():
            raise FileNotFoundError(f"{key}={given}: no such file")


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
    from warplca.config_validation import validate_train_config

    validate_train_config(cfg)  # every problem of every group at once, each named by its key
    validate_config(cfg)
    seed_everything(cfg.get("seed"))
    ctx = RunContext.from_config(cfg)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", ctx.run_dir)
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    metrics = run_stages(ctx, cfg.get("stages"))
    # The report stage prints the cold-vs-warm table itself: it stays the last thing on the console.
    if ctx.is_rank_zero and cfg.get("print_metrics", True) and "report" not in list(cfg.get("stages") or []):
        print_metrics(metrics, ctx.run_dir)
    return metrics
