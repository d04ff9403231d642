"""Stage "classify": noisy classification with pixel, cold-LCA and WARP-LCA front ends (README, "Noisy
classification").

One classifier per front end of ``model.classify.frontends``, trained on clean images and tested clean
and under every corruption × level. Writes ``classifier_<fe>.ckpt`` (its test rows inside, so a re-run
skips it), ``classifier.ckpt`` (``main_frontend``'s) and ``robustness.csv`` (the artifact) / ``.png`` /
``.md``. Accuracies are micro-averaged; ``mca`` is the mean over corruption × level.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from warplca.data.corruptions import DEFAULT_LEVELS
from warplca.evaluation.robustness import (
    condition_name,
    robustness_conditions,
    robustness_markdown,
    robustness_summary,
    save_robustness_plot,
    write_robustness_csv,
)
from warplca.frontends import FRONTENDS, FrontEnd, LCAFrontEnd, PixelFrontEnd, WarpLCAFrontEnd
from warplca.modules.noisy_classification import FrontEndDataModule, NoisyClassification
from warplca.serialization import CLASSIFIER_FILE, ROBUSTNESS_FILE
from warplca.settings import Annotated, Checked, Doc, Ge, NonEmpty, OneOf, build, declared, path_of
from warplca.tasks.context import RunContext
from warplca.tasks.utils import to_container

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "ClassifyStageSettings", "build_frontends", "classifier_file", "run", "settings"]

ARTIFACT = ROBUSTNESS_FILE

@dataclass(frozen=True)
class ClassifyStageSettings(Checked):
    """The keys of ``model.classify`` the stage reads itself (the rest are NoisyClassification's)."""

    frontends: Annotated[Sequence[str], OneOf(FRONTENDS, "front end"), NonEmpty()] = (
        "pixels", "lca", "warp_lca")
    lca_iters_cold: Annotated[int, Ge(1), Doc("LCA steps of the cold lca front end (protocol: ≥ 500)")] = 1000
    lca_iters_warm: Annotated[int, Ge(0), Doc("LCA steps after the warm start (protocol: ≤ 20)")] = 20
    corruptions: Annotated[Mapping[str, Sequence[float]] | None,
                           Doc("corruption -> levels (null: DEFAULT_LEVELS)")] = field(
        default_factory=lambda: dict(DEFAULT_LEVELS))
    corruption_seed: Annotated[int, Ge(0)] = 0
    cache_features: Annotated[bool | Literal["auto"], Doc("compute clean features once")] = "auto"
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: Annotated[int | None, Ge(1), Doc("null: the datamodule's")] = None
    test_batch_size: Annotated[int | None, Ge(1), Doc("null: batch_size")] = None
    feature_batch_size: Annotated[int, Ge(1)] = 256
    main_frontend: Annotated[str | None, Doc("copied to classifier.ckpt (null: best mCA)")] = "warp_lca"
    epochs: Annotated[int, Ge(1)] = 30

    def cross_check(self) -> Iterable[tuple[str, Any, str]]:
        try:
            robustness_conditions(self.corruptions)
        except ValueError as exc:
            yield "corruptions", dict(self.corruptions or {}), str(exc)
        if self.main_frontend is not None and self.main_frontend not in self.frontends:
            yield "main_frontend", self.main_frontend, f"must be one of the frontends {list(self.frontends)}"


def settings(ctx: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """(:class:`ClassifyStageSettings` as a dict, NoisyClassification keyword arguments) of
    ``model.classify``."""
    node = to_container(ctx.stage_config("classify")) or {}
    stage = asdict(build(ClassifyStageSettings, {k: node.pop(k) for k in declared(ClassifyStageSettings)
                                                 if k in node}, "model.classify"))
    node.setdefault("_target_", path_of(NoisyClassification))
    cold, warm = int(stage["lca_iters_cold"]), int(stage["lca_iters_warm"])
    if cold < 500 or warm > 20:
        log.warning("classify: lca_iters_cold=%d, lca_iters_warm=%d: the experiment's protocol is cold ≥ 500 "
                    "and warm ≤ 20 iterations", cold, warm)
    stage["frontends"] = list(stage["frontends"])
    stage["conditions"] = robustness_conditions(stage["corruptions"])
    return stage, node


def build_frontends(ctx: RunContext, stage: dict[str, Any]) -> dict[str, FrontEnd]:
    """The front ends to compare. ``lca`` and ``warp_lca`` share the bundle's dictionary, settings and
    normalisation when there is a bundle (``warp_path`` or ``warp_lca.pt``), else ``lca`` uses the run's."""
    from warplca.bundle import WarpLCA

    kinds = stage["frontends"]
    path = ctx.bundle_file()
    if "warp_lca" in kinds and not path.is_file():
        raise FileNotFoundError(f"classify: no WARP-LCA bundle at {path}; run the warp stage first "
                                "(stages=[dictionary,targets,warp,classify]), pass warp_path=<file>, "
                                "or drop warp_lca from model.classify.frontends")
    bundle = WarpLCA.load(path) if path.is_file() else None
    if bundle is not None:
        dictionary, lca_settings, norm = bundle.dictionary, bundle.lca.settings(), bundle.normalization
    elif "lca" in kinds:
        dictionary, lca_settings, norm = ctx.dictionary(), ctx.lca_settings(), ctx.normalization()
    else:
        dictionary, lca_settings, norm = None, None, ctx.datamodule.normalization
    channels = int(ctx.datamodule.channels)
    out: dict[str, FrontEnd] = {}
    for kind in kinds:
        if kind == "pixels":
            out[kind] = PixelFrontEnd(channels, norm)
        elif kind == "lca":
            out[kind] = LCAFrontEnd(dictionary, lca_settings, int(stage["lca_iters_cold"]), norm)
        else:
            out[kind] = WarpLCAFrontEnd(bundle, int(stage["lca_iters_warm"]))
    return out


def classifier_file(ctx: RunContext, frontend: str) -> Path:
    """``<run_dir>/classifier_<frontend>.ckpt``: one front end's trained classifier and its test rows."""
    return ctx.artifact(f"classifier_{frontend}.ckpt")


def _load_rows(path: Path) -> list[dict[str, Any]] | None:
    """The robustness rows stored in a finished ``classifier_<fe>.ckpt`` (None if unreadable, or if its
    accuracies were averaged another way than :attr:`NoisyClassification.ACCURACY_AVERAGE`)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated file: redo that front end
        log.warning("classify: cannot read %s (%s); retraining", path, exc)
        return None
    rows = ckpt.get("robustness_rows") if isinstance(ckpt, dict) else None
    if not rows:
        return None
    average = ckpt.get("accuracy_average", "macro")  # older checkpoints: torchmetrics' default, macro
    if average != NoisyClassification.ACCURACY_AVERAGE:
        log.warning("classify: %s holds %s-averaged accuracies (now %s: correct / images); recomputing",
                    path, average, NoisyClassification.ACCURACY_AVERAGE)
        return None
    return list(rows)


def _train_one(ctx: RunContext, kind: str, frontend: FrontEnd, stage: dict[str, Any],
               module_conf: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Train, test and save the classifier of one front end; returns its rows and extra metrics."""
    dm = ctx.datamodule
    num_classes = getattr(dm, "num_classes", None)
    if not num_classes:
        raise ValueError(f"classify needs a labelled dataset (data=digits, cifar10, ...); "
                         f"'{getattr(dm, 'name', type(dm).__name__)}' has no classes")
    dm.setup("test")
    image_size = int(dm.split_dataset("test")[0][0].shape[-1])
    conditions = stage["conditions"]
    module: NoisyClassification = instantiate(OmegaConf.create(module_conf), _convert_="all",
                                              frontend=frontend, num_classes=int(num_classes),
                                              image_size=image_size, conditions=conditions)
    fdm = FrontEndDataModule(dm, frontend, conditions, cache=stage["cache_features"],
                             corruption_seed=int(stage["corruption_seed"]), batch_size=stage["batch_size"],
                             test_batch_size=stage["test_batch_size"],
                             feature_batch_size=int(stage["feature_batch_size"]),
                             cache_dtype=getattr(torch, stage["cache_dtype"]),
                             seed=int(ctx.cfg.get("seed") or 0))
    trainer = ctx.trainer("classify", name=f"classify/{kind}")  # checkpoints/classify/<front end>
    resume = ctx.resume_checkpoint(f"classify/{kind}")
    log.info("classify/%s: training %s on %s features %s", kind, type(module.backbone).__name__, kind,
             module.feature_shape)
    with warnings.catch_warnings():  # the frozen front end is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=fdm, ckpt_path=resume)
    val_acc = trainer.callback_metrics.get("val/acc")
    trainer.test(module, datamodule=fdm, verbose=False)
    rows = list(module.robustness_rows)
    path = classifier_file(ctx, kind)
    module.robustness_rows = rows  # stored in the checkpoint by NoisyClassification.on_save_checkpoint
    trainer.save_checkpoint(path)
    extra = {"cache_s": float(fdm.cache_seconds), "epochs": float(trainer.current_epoch)}
    if val_acc is not None:
        extra["val_acc"] = float(val_acc)
    log.info("classify/%s: clean %.4f, saved %s", kind, rows[0]["accuracy"] if rows else float("nan"), path)
    return rows, extra


def _metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {f"{r['frontend']}/acc/{condition_name(r['corruption'], r['level'])}": float(r["accuracy"])
           for r in rows}
    for fe, s in robustness_summary(rows).items():
        out.update({f"{fe}/{k}": s[k] for k in ("clean", "mca", "ms_per_image")})
    return out


def run(ctx: RunContext) -> dict[str, float]:
    """Train and test one classifier per front end; write the robustness table, plot and markdown."""
    stage, module_conf = settings(ctx)
    frontends = build_frontends(ctx, stage)
    all_rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for kind, frontend in frontends.items():
        path = classifier_file(ctx, kind)
        rows = _load_rows(path) if path.is_file() and not ctx.force else None
        if rows is not None:
            log.info("classify/%s: %s exists, reusing its results (force=true to retrain)", kind, path.name)
            extra: dict[str, float] = {}
        else:
            rows, extra = _train_one(ctx, kind, frontend, stage, module_conf)
            ctx.finish_loggers()
        all_rows += rows
        mine = {**_metrics(rows), **{f"{kind}/{k}": v for k, v in extra.items()}}
        metrics.update(mine)
        ctx.log_metrics("classify", mine)
    if "warp_lca/mca" in metrics and "lca/mca" in metrics:  # the comparisons
        metrics["warp_minus_lca/mca"] = metrics["warp_lca/mca"] - metrics["lca/mca"]
        metrics["warp_minus_lca/clean"] = metrics["warp_lca/clean"] - metrics["lca/clean"]
        if metrics["warp_lca/ms_per_image"] > 0:
            metrics["cost_ratio/lca_over_warp"] = (metrics["lca/ms_per_image"]
                                                   / metrics["warp_lca/ms_per_image"])
    if "warp_lca/mca" in metrics and "pixels/mca" in metrics:
        metrics["warp_minus_pixels/mca"] = metrics["warp_lca/mca"] - metrics["pixels/mca"]
    if ctx.is_rank_zero:
        main = stage["main_frontend"] if stage["main_frontend"] in frontends else None
        if main is None:  # the best by mean corruption accuracy
            main = max(frontends, key=lambda k: metrics.get(f"{k}/mca", float("-inf")))
        shutil.copyfile(classifier_file(ctx, main), ctx.artifact(CLASSIFIER_FILE))
        save_robustness_plot(all_rows, ctx.artifact("robustness.png"))
        md = robustness_markdown(all_rows)
        ctx.artifact("robustness.md").write_text(md)
        write_robustness_csv(all_rows, ctx.artifact(ARTIFACT))  # the artifact: last
        log.info("classify: wrote %s\n%s", ctx.artifact(ARTIFACT), md)
    ctx.barrier()
    return metrics
