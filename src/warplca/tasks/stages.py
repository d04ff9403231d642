"""The stage registry: ``dictionary → targets → warp → ablation → learning_curve → levers → scaling →
classify → report``, and what each stage's artifact depends on.

A stage is a module ``warplca.tasks.stage_<name>`` with ``run(ctx) -> metrics`` and ``ARTIFACT`` (whose
existence means done; ``is_done(ctx)`` may replace that check). A done stage, or one whose artifact is
given (``<stage>_path=<file>``), is skipped unless ``force=true``.

:data:`STAGES` declares, per stage, the stages whose artifacts it reads and the config keys its own work
reads; its artifact depends on those keys and, transitively, on the settings of what it reads
(:func:`depends_on`). They are recorded when the artifact is written, and a run refuses to reuse an
artifact the config now describes differently (:mod:`warplca.tasks.provenance`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from warplca.serialization import read_metrics
from warplca.tasks import (
    provenance,
    stage_ablation,
    stage_classify,
    stage_dictionary,
    stage_learning_curve,
    stage_levers,
    stage_report,
    stage_scaling,
    stage_targets,
    stage_warp,
)
from warplca.tasks.context import RunContext
from warplca.tasks.utils import flatten_metrics

log = logging.getLogger(__name__)

__all__ = ["STAGES", "STAGE_ORDER", "Stage", "check_reused", "depends_on", "parse_stages", "resolve_stages",
           "reused_stages", "run_stages", "stage_done"]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its module, the stages whose artifacts it reads, and the config keys its own work
    reads (dotted prefixes of the train config; ``-a.b`` leaves a subtree out)."""

    module: ModuleType
    reads: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def artifact(self) -> str:
        """The file (relative to the run directory) whose existence means the stage is done."""
        return str(self.module.ARTIFACT)


_TRAINING = ("seed", "trainer")  # a stage that trains: its seed and its Trainer's limits and precision
_WARP = (*_TRAINING, "lca", "predictor", "loss", "model.warp")  # the study stages train variants of it
_STUDY = (*_WARP, "data", "study.split", "study.n_images", "study.iters", "study.budgets", "study.batch_size")

#: every stage, in pipeline order (``lca.iters``: the inference budget, which dictionary learning and the
#: targets replace by their own iteration counts)
STAGES: dict[str, Stage] = {
    "dictionary": Stage(stage_dictionary, (), (*_TRAINING, "data", "norm", "dictionary", "lca", "-lca.iters",
                                               "model.dictionary")),
    "targets": Stage(stage_targets, ("dictionary",), ("data", "norm", "lca", "-lca.iters", "targets",
                                                      "trainer.fast_dev_run")),
    "warp": Stage(stage_warp, ("dictionary", "targets"), _WARP),
    "ablation": Stage(stage_ablation, ("dictionary", "targets"), (*_STUDY, "study.ablation")),
    "learning_curve": Stage(stage_learning_curve, ("dictionary", "targets"),
                            (*_STUDY, "study.learning_curve")),
    "levers": Stage(stage_levers, ("dictionary", "targets"), (*_STUDY, "study.levers")),
    "scaling": Stage(stage_scaling, ("dictionary", "targets"), (*_STUDY, "study.scaling")),
    "classify": Stage(stage_classify, ("dictionary", "warp"), (*_TRAINING, "data", "norm", "lca",
                                                               "model.classify")),
    "report": Stage(stage_report, ("warp",), ("data", "eval")),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def parse_stages(stages: Iterable[str] | str | None) -> list[str]:
    """The stage names of a ``stages`` value as given (a list, or a string such as ``"[warp,report]"``),
    unchecked and in the given order."""
    if stages is None:
        return []
    if isinstance(stages, str):
        stages = stages.strip().strip("[]").split(",")
    return [name for name in (str(s).strip() for s in stages) if name]


def resolve_stages(stages: Iterable[str] | str | None) -> list[str]:
    """Validate stage names and put them in pipeline order (duplicates dropped)."""
    names = parse_stages(stages)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages: {list(STAGE_ORDER)} "
                         f"(e.g. stages=[dictionary,targets])")
    return [s for s in STAGE_ORDER if s in names]


def _given(cfg: DictConfig, name: str) -> Any:
    """``cfg.<name>_path``: the stage's artifact given by path (None when not)."""
    return cfg.get(f"{name}_path")


def depends_on(cfg: DictConfig, name: str) -> dict[str, Any]:
    """The resolved settings the artifact of stage ``name`` depends on, as flat dotted keys: the stage's own
    keys plus, for each stage it reads, that stage's settings, or ``<stage>_path`` when the config gives
    that artifact by path."""
    stage = STAGES[name]
    settings = provenance.resolve_settings(cfg, stage.keys)
    for upstream in stage.reads:
        given = _given(cfg, upstream)
        settings.update({f"{upstream}_path": str(given)} if given else depends_on(cfg, upstream))
    return dict(sorted(settings.items()))


def stage_done(ctx: RunContext, name: str) -> str | None:
    """Why stage ``name`` can be skipped (a message), or None if it must run."""
    given = _given(ctx.cfg, name)
    if given:
        return f"using {name}_path={given}"
    if ctx.force:
        return None
    module = STAGES[name].module
    is_done = getattr(module, "is_done", None)
    artifact = STAGES[name].artifact
    if callable(is_done):
        return f"{artifact} is complete (force=true to redo)" if is_done(ctx) else None
    if ctx.artifact(artifact).exists():
        return f"{artifact} exists (force=true to redo)"
    return None


def reused_stages(ctx: RunContext, names: Iterable[str]) -> list[str]:
    """The stages whose existing artifacts running ``names`` would use as they are: requested stages that
    are not forced, and the stages those read that are not requested; artifacts given by path (and what
    they were made from) are not included."""
    requested = set(names)
    found: set[str] = set()

    def visit(name: str) -> None:
        if _given(ctx.cfg, name):
            return
        remade = name in requested and ctx.force
        if not remade and ctx.artifact(STAGES[name].artifact).exists():
            found.add(name)
        for upstream in STAGES[name].reads:
            if upstream not in requested:
                visit(upstream)

    for name in requested:
        visit(name)
    return [s for s in STAGE_ORDER if s in found]


def check_reused(ctx: RunContext, names: Iterable[str]) -> list[str]:
    """Refuse (:class:`~warplca.tasks.provenance.ProvenanceMismatchError`, naming every differing key of
    every stage) before any work when an artifact this run would reuse was made with other settings;
    returns the reused stages that have no record yet."""
    names = list(names)
    stale: dict[str, dict[str, tuple[Any, Any]]] = {}
    unrecorded: list[str] = []
    for name in reused_stages(ctx, names):
        diff = provenance.verify(ctx.run_dir, name, STAGES[name].artifact, depends_on(ctx.cfg, name))
        if diff is None:
            unrecorded.append(name)
        elif diff:
            stale[name] = diff
    if stale:
        raise provenance.ProvenanceMismatchError(ctx.run_dir, stale,
                                                 {name: STAGES[name].artifact for name in stale},
                                                 redo=resolve_stages([*names, *stale]))
    return unrecorded


def _record(ctx: RunContext, name: str) -> None:
    """Record what stage ``name``'s artifact depends on (rank 0, when the artifact exists)."""
    if ctx.is_rank_zero and ctx.artifact(STAGES[name].artifact).exists():
        provenance.write_record(ctx.run_dir, name, depends_on(ctx.cfg, name))


def run_stages(ctx: RunContext, stages: Iterable[str] | str | None) -> dict[str, float]:
    """Run the given stages in order, recording what each artifact was made with; returns all metrics of
    the run (skipped stages' from ``metrics.json``) as flat ``stage/key`` names."""
    names = resolve_stages(stages)
    unrecorded = check_reused(ctx, names)
    computed: dict[str, dict[str, Any]] = {}
    for name in names:
        reason = stage_done(ctx, name)
        if reason is not None:
            log.info("skipping %s: %s", name, reason)
            continue
        log.info("stage %s: starting (run dir %s)", name, ctx.run_dir)
        start = time.perf_counter()
        try:
            metrics = dict(STAGES[name].module.run(ctx) or {})
        finally:
            ctx.finish_loggers()
        metrics.setdefault("time_s", time.perf_counter() - start)
        log.info("stage %s: done in %.1f s", name, metrics["time_s"])
        ctx.log_metrics(name, metrics)
        _record(ctx, name)
        computed[name] = metrics
        ctx.barrier()
    for name in unrecorded:  # artifacts of an older version, reused without trouble: trusted from now on
        if name not in computed:
            _record(ctx, name)
    merged = read_metrics(ctx.run_dir) if ctx.is_rank_zero else {}
    for name, metrics in computed.items():
        merged.setdefault(name, {}).update(metrics)
    return flatten_metrics(merged)
