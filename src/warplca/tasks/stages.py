"""The stage registry: ``dictionary → targets → warp → ablation → learning_curve → levers → classify →
report``.

A stage is a module ``warplca.tasks.stage_<name>`` with ``run(ctx) -> metrics`` and ``ARTIFACT`` (whose
existence means done, or None; ``is_done(ctx)`` may replace that check). A done stage, or one whose
artifact is given (``<stage>_path=<file>``), is skipped unless ``force=true``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from warplca.tasks.context import RunContext
from warplca.tasks.utils import flatten_metrics

log = logging.getLogger(__name__)

__all__ = ["STAGE_ORDER", "StageNotAvailableError", "load_stage", "resolve_stages", "run_stages",
           "stage_done"]

STAGE_ORDER: tuple[str, ...] = ("dictionary", "targets", "warp", "ablation", "learning_curve", "levers",
                                "classify", "report")


class StageNotAvailableError(ImportError):
    """The stage's module ``warplca.tasks.stage_<name>`` does not exist in this installation."""


def resolve_stages(stages: Iterable[str] | str | None) -> list[str]:
    """Validate stage names and put them in pipeline order (duplicates dropped)."""
    if stages is None:
        return []
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.strip("[]").split(",") if s.strip()]
    names = [str(s) for s in stages]
    unknown = [s for s in names if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages: {list(STAGE_ORDER)} "
                         f"(e.g. stages=[dictionary,targets])")
    return [s for s in STAGE_ORDER if s in names]


def load_stage(name: str) -> ModuleType:
    """Import ``warplca.tasks.stage_<name>`` and check it has ``run``."""
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r}; valid stages: {list(STAGE_ORDER)}")
    modname = f"warplca.tasks.stage_{name}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise StageNotAvailableError(f"stage {name} is not available: module {modname} is not installed "
                                         f"(drop it from stages=[...])") from exc
        raise
    if not callable(getattr(module, "run", None)):
        raise StageNotAvailableError(f"stage {name} is not available: {modname} defines no run(ctx)")
    return module


def stage_done(ctx: RunContext, module: ModuleType) -> str | None:
    """Why the stage can be skipped (a message), or None if it must run."""
    name = module.__name__.rsplit("stage_", 1)[-1]
    given = ctx.cfg.get(f"{name}_path")
    if given:
        return f"using {name}_path={given}"
    if ctx.force:
        return None
    is_done = getattr(module, "is_done", None)
    artifact = getattr(module, "ARTIFACT", None)
    if callable(is_done):
        return f"{artifact or 'its output'} is complete (force=true to redo)" if is_done(ctx) else None
    if artifact and ctx.artifact(artifact).exists():
        return f"{artifact} exists (force=true to redo)"
    return None


def run_stages(ctx: RunContext, stages: Iterable[str] | str | None) -> dict[str, float]:
    """Run the given stages in order; returns all metrics of the run (skipped stages' from
    ``metrics.json``) as flat ``stage/key`` names."""
    names = resolve_stages(stages)
    modules = {name: load_stage(name) for name in names}
    computed: dict[str, dict[str, Any]] = {}
    for name, module in modules.items():
        reason = stage_done(ctx, module)
        if reason is not None:
            log.info("skipping %s: %s", name, reason)
            continue
        log.info("stage %s: starting (run dir %s)", name, ctx.run_dir)
        start = time.perf_counter()
        try:
            metrics = dict(module.run(ctx) or {})
        finally:
            ctx.finish_loggers()
        metrics.setdefault("time_s", time.perf_counter() - start)
        log.info("stage %s: done in %.1f s", name, metrics["time_s"])
        ctx.log_metrics(name, metrics)
        computed[name] = metrics
        ctx.barrier()
    merged = ctx.read_metrics() if ctx.is_rank_zero else {}
    for name, metrics in computed.items():
        merged.setdefault(name, {}).update(metrics)
    return flatten_metrics(merged)
