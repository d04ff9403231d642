"""Stage "targets": cache the cold-LCA target states WARP-CNN is trained on.

Each split of ``targets.splits`` is coded with cold LCA for ``targets.iters`` steps into
``<run_dir>/targets/<split>/`` (:mod:`warplca.data.target_cache`) through the run's Trainer
(``trainer.predict``), resumably. ``targets/COMPLETE`` is written last; :func:`is_done` also checks each
manifest against the config, so a changed λ or dictionary re-enters the stage (``force=true`` rebuilds).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import OmegaConf

from warplca.data.datamodule import SPLITS
from warplca.data.target_cache import (
    TargetCache,
    TargetCacheIncompleteError,
    TargetCacheMismatchError,
    expected_manifest,
)
from warplca.data.target_store import COMPLETE
from warplca.lca import LCA, ConvDictionary
from warplca.lca.continuation import Continuation
from warplca.modules.target_builder import build_target_cache
from warplca.serialization import TARGETS_DIR, write_text_atomic
from warplca.settings import Annotated, Checked, Doc, Ge, OneOf, build
from warplca.tasks.context import RunContext
from warplca.tasks.utils import to_container

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "TargetSettings", "cache_dir", "expected", "is_done", "run", "settings"]

ARTIFACT = f"{TARGETS_DIR}/{COMPLETE}"


@dataclass(frozen=True)
class TargetSettings(Checked):
    """The ``targets`` group: what the state-target caches hold and how they are built (conf/targets)."""

    iters: Annotated[int, Ge(1), Doc("target_iters: LCA steps per target")] = 600
    splits: Annotated[Sequence[str], OneOf(SPLITS, "split"), Doc("train is required")] = ("train", "val")
    batch_size: Annotated[int, Ge(1), Doc("images per solver call")] = 128
    chunk_size: Annotated[int, Ge(1), Doc("images per chunk: the unit of resumption and sharding")] = 256
    limit: Annotated[int | None, Ge(1), Doc("cache only the first n images of each split")] = None
    num_workers: Annotated[int, Ge(0)] = 0
    solver: Annotated[str, OneOf(("cold", "continuation"), "target solver"),
                      Doc("continuation: λ annealed from start_factor·λ (a lower, sparser minimum)")] = (
        "continuation")
    continuation: Continuation = Continuation()

    def cross_check(self) -> Iterable[tuple[str, Any, str]]:
        if "train" not in self.splits:
            yield "splits", list(self.splits), "must include train (the warp stage trains on it)"


def solver_spec(conf: dict[str, Any]) -> dict[str, Any] | str:
    """The target solver of the ``targets`` config: ``cold`` or continuation with its parameters."""
    if conf["solver"] == "continuation":
        return {"name": "continuation", **(conf.get("continuation") or {})}
    return str(conf["solver"])


def settings(ctx: RunContext) -> dict[str, Any]:
    """The ``targets`` config as :class:`TargetSettings` (a plain dict). Under ``trainer.fast_dev_run`` only
    the first chunk of each split is cached."""
    out = asdict(build(TargetSettings, to_container(ctx.cfg.get("targets")), "targets"))
    out["splits"] = [str(s) for s in out["splits"]]
    if OmegaConf.select(ctx.cfg, "trainer.fast_dev_run"):
        limit = out["limit"] if out["limit"] is not None else math.inf
        out["limit"] = int(min(limit, out["chunk_size"]))
    return out


def cache_dir(ctx: RunContext, split: str) -> Any:
    """Where the ``split`` cache lives: ``<run_dir>/targets/<split>``."""
    return ctx.artifact(f"{TARGETS_DIR}/{split}")


def _cache_kwargs(ctx: RunContext, split: str, conf: dict[str, Any]) -> dict[str, Any]:
    """What identifies the ``split`` cache besides dictionary, LCA, iterations and normalisation."""
    dm = ctx.datamodule
    data = to_container(ctx.cfg.get("data")) or {}
    return {"dataset_name": str(getattr(dm, "name", type(dm).__name__)), "split": split,
            "dataset_config": data if isinstance(data, dict) else {}, "chunk_size": int(conf["chunk_size"]),
            "limit": conf["limit"], "solver": solver_spec(conf)}


def expected(ctx: RunContext, split: str, dictionary: ConvDictionary, lca: LCA, normalization: Any,
             conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest the ``split`` cache must have for the current config."""
    conf = settings(ctx) if conf is None else conf
    return expected_manifest(ctx.datamodule.split_dataset(split), dictionary, lca.settings(),
                             int(conf["iters"]), normalization, **_cache_kwargs(ctx, split, conf))


def is_done(ctx: RunContext) -> bool:
    """``targets/COMPLETE`` exists and every split's cache is complete and matches the config."""
    if not ctx.artifact(ARTIFACT).is_file():
        return False
    conf = settings(ctx)
    dictionary, lca, norm = ctx.coding()
    for split in conf["splits"]:
        try:
            TargetCache.open(cache_dir(ctx, split), expected(ctx, split, dictionary, lca, norm, conf))
        except (FileNotFoundError, TargetCacheIncompleteError, TargetCacheMismatchError, ValueError) as exc:
            log.info("targets: %s cache needs work: %s", split, str(exc).splitlines()[0])
            return False
    return True


def run(ctx: RunContext) -> dict[str, float]:
    """Build (or finish) every split's cache; metrics: counts, mean cold energy and ℓ0 per split."""
    conf = settings(ctx)
    dictionary, lca, norm = ctx.coding()
    dm = ctx.datamodule
    if ctx.is_rank_zero:
        ctx.artifact(ARTIFACT).unlink(missing_ok=True)
    metrics: dict[str, float] = {"target_iters": float(conf["iters"])}
    summary: dict[str, Any] = {}
    for split in conf["splits"]:
        trainer = ctx.trainer("targets", logger=False, fast_dev_run=False, limit_predict_batches=1.0)
        cache = build_target_cache(
            cache_dir(ctx, split), dm.split_dataset(split), dictionary, lca, int(conf["iters"]), norm,
            batch_size=int(conf["batch_size"]), num_workers=int(conf["num_workers"]), trainer=trainer,
            overwrite=ctx.force, **_cache_kwargs(ctx, split, conf))
        stats = cache.stats()
        summary[split] = {**stats, "shape": list(cache.shape)}
        metrics.update({f"{split}/count": float(cache.count), f"{split}/energy": stats["energy"],
                        f"{split}/l0_per_image": stats["l0_per_image"]})
        log.info("targets [%s]: %s, mean cold energy %.4g, mean ℓ0 %.1f", split, cache, stats["energy"],
                 stats["l0_per_image"])
    if ctx.is_rank_zero:
        text = json.dumps({"target_iters": conf["iters"], "splits": summary}, indent=2)
        write_text_atomic(ctx.artifact(ARTIFACT), text)
    ctx.barrier()
    return metrics
