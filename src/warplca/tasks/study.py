"""Shared machinery of the warm-start study stages (``ablation``, ``learning_curve``, ``levers``,
``scaling``).

A study (rank 0 only) trains WARP-CNN variants on the train-split target cache and scores each against
one cold-LCA run on ``study.split`` images (never the test split). Finished variants are kept in
``<name>.partial.json`` so an interrupted study resumes; the CSV (the artifact) is written last.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from warplca.bundle import WarpLCA
from warplca.data.datamodule import SPLITS
from warplca.data.target_cache import TargetDataset
from warplca.evaluation.common import resolve_device
from warplca.evaluation.curves import Curves
from warplca.evaluation.experiments import eval_images
from warplca.evaluation.report import write_csv
from warplca.evaluation.warm_start_study import (
    best_variant,
    cold_reference,
    cold_row,
    format_scores,
    score_warm_start,
    study_table,
)
from warplca.losses import LOSSES
from warplca.serialization import write_text_atomic
from warplca.settings import Annotated, Checked, Doc, Ge, Gt, Le, NonEmpty, OneOf, build
from warplca.source import stamp
from warplca.tasks.context import RunContext, RunSettings
from warplca.tasks.predictor_fit import (
    INPUTS,
    build_module,
    build_predictor,
    fit_quietly,
    target_sets,
    warp_data_settings,
)
from warplca.tasks.utils import evaluation_device_name, to_container

log = logging.getLogger(__name__)

__all__ = ["INPUTS", "Study", "StudySettings", "study_settings"]


EPOCHS = Doc("epochs per variant (null: the warp stage's)")


@dataclass(frozen=True)
class AblationSettings(Checked):
    """``study.ablation``: one variant per loss × predictor input."""

    losses: Annotated[Sequence[str], OneOf(LOSSES, "loss"), NonEmpty()] = ("laplacian", "mse", "l1")
    inputs: Annotated[Sequence[str], OneOf(INPUTS, "input"), NonEmpty()] = ("image", "image+drive")
    epochs: Annotated[int | None, Ge(1), EPOCHS] = None


@dataclass(frozen=True)
class LearningCurveSettings(Checked):
    """``study.learning_curve``: one variant per training-set size × epochs."""

    sizes: Annotated[Sequence[int], Ge(1), Doc("training-set sizes (clipped to the cache)")] = (
        256, 512, 1024, 2048)
    epochs: Annotated[Sequence[int], Ge(1)] = (10, 20, 40)


@dataclass(frozen=True)
class EnergyFinetuneSettings(Checked):
    """``study.levers.energy_finetune``: the baseline fine-tuned with w · the LCA energy, per weight w."""

    weights: Annotated[Sequence[float], Ge(0), Doc("w of the energy term ([] skips it)")] = (0.0003, 0.001)
    epochs: Annotated[int, Ge(1)] = 10
    lr: Annotated[float, Gt(0)] = 0.0003


@dataclass(frozen=True)
class LeversSettings(Checked):
    """``study.levers``: predictor shapes, augmentation, self-distillation, the energy fine-tune."""

    predictors: Annotated[Mapping[str, Any], Doc("name -> predictor overrides, one variant each")] = field(
        default_factory=lambda: {"small": {"width": 32, "depth": 3}, "kernel5": {"kernel_size": 5}})
    augment: Annotated[bool, Doc("add a flipped/rotated copy of every training crop")] = True
    self_distill: Annotated[bool, Doc("retrain on the baseline's own warm-started states")] = True
    energy_finetune: EnergyFinetuneSettings = EnergyFinetuneSettings()
    epochs: Annotated[int | None, Ge(1), EPOCHS] = None


@dataclass(frozen=True)
class ScalingSettings(Checked):
    """``study.scaling``: the grid of the scaling-law stage and how its law is fitted."""

    sizes: Annotated[Sequence[int], Ge(1), NonEmpty(), Doc("training-set sizes (clipped to the cache)")] = (
        512, 1024, 2048, 4096, 8192, 16384)
    predictors: Annotated[Mapping[str, Any], Doc("name -> predictor overrides (capacity axis)")] = field(
        default_factory=lambda: {"small": {"width": 32, "depth": 3}, "medium": {"width": 64, "depth": 5},
                                 "large": {"width": 96, "depth": 6}})
    steps: Annotated[int, Ge(1), Doc("optimiser steps of every point, whatever its size")] = 800
    seeds: Annotated[Sequence[int], NonEmpty(), Doc("seeds (initial weights, data order, subset)")] = (0, 1)
    seeded: Annotated[Sequence[str], Doc("predictors trained with every seed (others: the first)")] = (
        "small", "medium")
    long_factor: Annotated[int, Ge(1), Doc("the steps multiplier of the data-vs-compute level")] = 4
    long_sizes: Annotated[Sequence[int], Ge(1), Doc("sizes trained for long_factor × steps")] = (
        1024, 4096, 16384)
    long_predictor: Annotated[str, Doc("the predictor of the long level")] = "medium"
    ks: Annotated[Sequence[int], Ge(0), NonEmpty(), Doc("WARP-LCA steps k of the fitted gaps")] = (0, 1, 10)
    reference_iters: Annotated[int, Ge(1), Doc("steps of the long cold / continuation runs (E_ref)")] = 3000
    ood_images: Annotated[int, Ge(0), Doc("crops of eval=ood's photos of other scenes (0: none)")] = 56
    holdout: Annotated[float, Gt(0), Le(1), Doc("fit on sizes ≤ holdout × the largest; predict it")] = 0.25
    bootstrap: Annotated[int, Ge(10), Doc("bootstrap replicates (photos and seeds resampled)")] = 200

    def cross_check(self) -> Any:
        unknown = sorted({*self.seeded, self.long_predictor} - set(self.predictors))
        if unknown:
            yield "seeded", list(self.seeded), f"names predictors not in study.scaling.predictors: {unknown}"


@dataclass(frozen=True)
class StudySettings(Checked):
    """The ``study`` group: how the warm-start study stages score their variants (conf/study)."""

    split: Annotated[str, OneOf(SPLITS, "split"), Doc("never test: picking from these tables")] = "val"
    n_images: Annotated[int | None, Ge(1)] = 64
    iters: Annotated[int | None, Ge(1), Doc("T, the reference budget (null: lca.iters)")] = None
    budgets: Annotated[Sequence[int], Ge(1), Doc("early budgets k tabulated")] = (10, 100)
    batch_size: Annotated[int, Ge(1), Doc("LCA batch when scoring")] = 64
    ablation: AblationSettings = AblationSettings()
    learning_curve: LearningCurveSettings = LearningCurveSettings()
    levers: LeversSettings = LeversSettings()
    scaling: ScalingSettings = ScalingSettings()


def study_settings(ctx: RunContext) -> dict[str, Any]:
    """The ``study`` config as :class:`StudySettings` (a plain dict)."""
    return asdict(build(StudySettings, to_container(ctx.cfg.get("study")), "study"))


class Study:
    """One study stage's state: the train targets, the scoring images (the first ``study.n_images`` of
    ``study.split``) and their cold-LCA reference run up to T."""

    @classmethod
    def for_stage(cls, ctx: RunContext, name: str, selectors: Sequence[str] = ()) -> Study | None:
        """The study of stage ``name`` (its settings in ``self.conf``), or None off global rank 0.
        ``selectors``: keys of the stage's settings that only choose which variants run (or how they are
        summarised): changing them keeps the variants already scored."""
        return cls(ctx, name, study_settings(ctx), selectors) if ctx.is_rank_zero else None

    def __init__(self, ctx: RunContext, name: str, settings: dict[str, Any],
                 selectors: Sequence[str] = ()) -> None:
        self.ctx, self.name, self.settings = ctx, name, settings
        self.conf: dict[str, Any] = settings[name]
        self.dictionary, self.lca, self.norm = ctx.coding()
        sets = target_sets(ctx, self.dictionary, self.lca, self.norm, splits=("train",))
        self.train: TargetDataset = sets["train"]
        self.device = resolve_device(evaluation_device_name(ctx.cfg))
        self.total = int(settings.get("iters") or self.lca.iters)
        self.budgets = [int(b) for b in settings["budgets"] if 0 < int(b) < self.total]
        self.early = self.budgets[0] if self.budgets else self.total
        self.show_progress = bool(ctx.cfg.get("progress", RunSettings.progress))
        # cold runs never call the predictor: the bundle only supplies preprocessing and the solver
        model = WarpLCA(self.dictionary, build_predictor(ctx, self.dictionary), self.lca, self.norm)
        model = model.to(self.device)
        split = str(settings["split"])
        self.images: torch.Tensor = eval_images(ctx.datamodule, model, split, settings.get("n_images"))
        self.data_name = f"{getattr(ctx.datamodule, 'name', 'data')}/{split}"
        self.cold: Curves = cold_reference(model, self.images, self.total, self.budgets,
                                           int(settings["batch_size"]), self.device, self.show_progress)
        self.cold_scores = cold_row(self.cold, self.budgets)
        self._partial = ctx.artifact(f"{name}.partial.json")
        tagged = {**settings, name: {k: v for k, v in self.conf.items() if k not in selectors}}
        self._tag = json.dumps({"settings": tagged, "n_train": len(self.train),
                                "dictionary": self.dictionary.fingerprint()}, sort_keys=True, default=str)
        self.rows: list[dict[str, Any]] = self._load_partial()
        self.models: dict[str, WarpLCA] = {}  # the variants trained by this process, by variant name

    # -- resumption -------------------------------------------------------------------------------------
    def _load_partial(self) -> list[dict[str, Any]]:
        if not self._partial.is_file():
            return []
        try:
            data = json.loads(self._partial.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s: unreadable %s, starting the study afresh", self.name, self._partial)
            return []
        if data.get("tag") != self._tag:
            log.info("%s: %s belongs to other settings, starting afresh", self.name, self._partial.name)
            return []
        rows = list(data.get("rows") or [])
        log.info("%s: resuming, %d variant(s) already scored", self.name, len(rows))
        return rows

    # -- variants -------------------------------------------------------------------------------------
    def fit(self, epochs: int, limit: int | None = None, predictor_overrides: Mapping[str, Any] | None = None,
            module_overrides: Mapping[str, Any] | None = None, train: Dataset | None = None,
            init: WarpLCA | None = None, steps: int | None = None,
            seed: int | None = None) -> tuple[WarpLCA, int, float]:
        """Train one predictor (the run's initial weights, or ``init``'s) on ``train`` (default: the cached
        targets) for ``epochs`` or exactly ``steps`` optimiser steps; ``seed`` (default: the run's) seeds
        the initial weights and the data order. Returns its bundle, parameter count and training seconds."""
        start = time.perf_counter()
        seed = int(self.ctx.cfg.get("seed") or 0) if seed is None else int(seed)
        torch.manual_seed(seed)  # the same initial weights for every variant of one seed
        module, n_params = build_module(self.ctx, self.dictionary, self.lca, self.norm, predictor_overrides,
                                        module_overrides, init=None if init is None else init.predictor)
        fit_quietly(self.ctx, module, self.train if train is None else train, epochs, limit, steps, seed)
        return module.bundle().to(self.device), n_params, time.perf_counter() - start

    def variant(self, key: Mapping[str, Any], epochs: int, limit: int | None = None,
                predictor_overrides: Mapping[str, Any] | None = None,
                module_overrides: Mapping[str, Any] | None = None,
                train: Callable[[], Dataset] | None = None,
                init: Callable[[], WarpLCA] | None = None, steps: int | None = None,
                seed: int | None = None,
                score: Callable[[WarpLCA], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Train (unless already scored) and score one variant; returns its row (``key`` + scores).
        ``train`` and ``init`` are called only when the variant is trained; ``score`` replaces the
        standard scores (:func:`score_warm_start` on the study images)."""
        for row in self.rows:
            if all(row.get(k) == v for k, v in key.items()):
                return row
        model, n_params, train_s = self.fit(epochs, limit, predictor_overrides, module_overrides,
                                            None if train is None else train(),
                                            None if init is None else init(), steps, seed)
        self.models[str(key.get("variant"))] = model
        label = ", ".join(f"{k}={v}" for k, v in key.items())
        scores = score(model) if score is not None else score_warm_start(
            model, self.images, self.cold, self.budgets, int(self.settings["batch_size"]), self.device,
            self.show_progress, desc=f"{self.name} [{label}]")
        row = {**key, **scores, "train_s": round(train_s, 1), "params": n_params}
        log.info("%s [%s]: %s", self.name, label, format_scores(row, self.total, self.early))
        self.rows.append(row)
        write_text_atomic(self._partial, json.dumps({"tag": self._tag, "rows": self.rows}, default=float))
        return row

    def baseline(self, epochs: int) -> WarpLCA:
        """The ``baseline`` variant's model, trained now if this process has not (a resumed study)."""
        if "baseline" not in self.models:
            self.models["baseline"] = self.fit(epochs)[0]
        return self.models["baseline"]

    def epochs(self) -> int:
        """Epochs per variant: the stage's ``epochs``, else the warp stage's ``model.warp.epochs``."""
        return int(self.conf.get("epochs") or warp_data_settings(self.ctx)[1]["epochs"])

    def lca_input(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images in the coded space on the study's device (the run's normalisation)."""
        images = images.to(self.device)
        return images if self.norm is None else self.norm.apply(images)

    def finish(self) -> None:
        """Drop the partial file (the stage wrote its artifact)."""
        self._partial.unlink(missing_ok=True)

    # -- outputs --------------------------------------------------------------------------------------
    def publish(self, title: str, what: str, rows: list[dict[str, Any]], columns: list[str],
                plot: Callable[..., Path]) -> dict[str, float]:
        """Write ``<name>.png`` (``plot(rows, cold_row, T, early, path)``), ``<name>.md`` and (last)
        ``<name>.csv``, drop the partial file and print the section (header, table with cold LCA last,
        best variant, figure); returns the metrics."""
        cold = {**dict.fromkeys(columns, "—"), "variant": "cold LCA", **self.cold_scores}
        cold_t = self.cold_scores[f"energy@{self.total}"]
        best = best_variant(rows, self.total)
        md = (f"## {title}\n\n{what} Scored on {self.images.shape[0]} held-out {self.data_name} images "
              f"(selection never sees the test split) against cold LCA with the same settings: "
              f"T = {self.total}, cold energy {cold_t:.4g} at T and "
              f"{self.cold_scores[f'energy@{self.early}']:.4g} after {self.early} iterations; "
              f"{len(self.train)} cached training targets.\n\n"
              + study_table([*rows, cold], columns, self.total, self.budgets)
              + f"\nBest here: **{best['variant']}**.\n\n![{self.name}]({self.name}.png)\n\n{stamp()}\n")
        plot(rows, cold, self.total, self.early, self.ctx.artifact(f"{self.name}.png"))
        write_text_atomic(self.ctx.artifact(f"{self.name}.md"), md)
        write_csv(self.ctx.artifact(f"{self.name}.csv"), rows)
        self.finish()
        metrics: dict[str, float] = {"cold/energy@T": cold_t, "T": float(self.total)}
        for row in rows:
            label = re.sub(r"[^A-Za-z0-9+.=-]+", "_", str(row["variant"])).strip("_")
            for key in ("iterations_to_match", f"energy@{self.early}", "energy_ratio@T"):
                metrics[f"{label}/{key}"] = float(row[key])
        print("\n" + md, flush=True)
        return metrics
