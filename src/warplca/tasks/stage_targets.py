"""Stage "targets": cache the cold-LCA target states WARP-CNN is trained on.

For each split in ``targets.splits`` the run's dictionary, ``lca`` settings and normalisation code
the split's images with cold LCA for ``targets.iters`` steps; the states go to
``<run_dir>/targets/<split>/`` (see :mod:`warplca.data.target_cache`). The build runs through the
run's Trainer (``trainer.predict``: devices / DDP and the progress bar with ETA come from the
``trainer`` group) and is resumable: an interrupted stage picks up at the first unfinished chunk.

``ARTIFACT`` is ``targets/COMPLETE``, written after every split is complete; :func:`is_done` also
checks each split's manifest against the current config, so a changed λ or dictionary re-enters the
stage, which then refuses the stale cache with the differing keys (``force=true`` rebuilds it).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from omegaconf import OmegaConf

from warplca.config_defaults import primary_defaults
from warplca.data.target_cache import (
    TargetCache,
    TargetCacheIncompleteError,
    TargetCacheMismatchError,
    build_target_cache,
    expected_manifest,
)
from warplca.lca import LCA, ConvDictionary
from warplca.serialization import write_text_atomic
from warplca.tasks.context import RunContext
from warplca.tasks.utils import to_container

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "cache_dir", "expected", "is_done", "run", "settings"]

ARTIFACT = "targets/COMPLETE"


def solver_spec(conf: dict[str, Any]) -> dict[str, Any] | str:
    """The target solver of the ``targets`` config: ``cold`` or continuation with its parameters."""
    if conf["solver"] == "continuation":
        return {"name": "continuation", **(conf.get("continuation") or {})}
    return str(conf["solver"])


def settings(ctx: RunContext) -> dict[str, Any]:
    """The ``targets`` config, keys it leaves out or null taken from ``conf/targets/default.yaml``
    (the YAML is the only place a default lives); unknown keys refused.

    Under ``trainer.fast_dev_run`` only the first chunk of each split is cached (a smoke test).
    """
    defaults = primary_defaults("targets")
    conf = to_container(ctx.cfg.get("targets")) or {}
    unknown = sorted(set(conf) - set(defaults))
    if unknown:
        raise ValueError(f"unknown targets config keys {unknown}; known: {sorted(defaults)}")
    out = {**defaults, **{k: v for k, v in conf.items() if v is not None or k == "limit"}}
    out["splits"] = [str(s) for s in out["splits"]]
    if "train" not in out["splits"]:
        raise ValueError(f"targets.splits must include train (the warp stage trains on it), "
                         f"got {out['splits']}")
    if OmegaConf.select(ctx.cfg, "trainer.fast_dev_run"):
        limit = out["limit"] if out["limit"] is not None else math.inf
        out["limit"] = int(min(limit, out["chunk_size"]))
    return out


def cache_dir(ctx: RunContext, split: str) -> Any:
    return ctx.artifact(f"targets/{split}")


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
    dictionary = ctx.dictionary()
    lca, norm = ctx.lca(dictionary), ctx.normalization()
    for split in conf["splits"]:
        try:
            TargetCache.open(cache_dir(ctx, split), expected(ctx, split, dictionary, lca, norm, conf))
        except (FileNotFoundError, TargetCacheIncompleteError, TargetCacheMismatchError, ValueError) as exc:
            log.info("targets: %s cache needs work: %s", split, str(exc).splitlines()[0])
            return False
    return True


def run(ctx: RunContext) -> dict[str, float]:
    conf = settings(ctx)
    dictionary = ctx.dictionary()
    lca = ctx.lca(dictionary)
    norm = ctx.normalization()
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
