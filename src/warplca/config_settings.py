"""The settings of every config group, declared once: one :class:`~warplca.config_parsing.Group` per node.
Cross-group checks are in :mod:`warplca.preflight`; Trainer values Lightning refuses itself are left to it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from warplca.config_parsing import Group, Instances, Keys, Settings, Target, Yaml, is_number
from warplca.config_parsing import Rule as R
from warplca.data.corruptions import CORRUPTIONS
from warplca.data.datamodule import SPLITS
from warplca.data.normalization import KINDS
from warplca.evaluation.experiments import MODES
from warplca.frontends import FRONTENDS
from warplca.lca.dictionary import PADDING_MODES
from warplca.lca.thresholds import THRESHOLDS
from warplca.losses import LOSSES
from warplca.models.classifiers import BACKBONES
from warplca.models.warp_cnn import ACTIVATIONS, DRIVE_MODES
from warplca.tasks.predictor_fit import DATA_KEYS, INPUTS, PIPELINE_KEYS
from warplca.tasks.stage_classify import STAGE_KEYS
from warplca.tasks.stages import STAGE_ORDER

__all__ = ["EVAL", "EVAL_RUN", "INSTANCES", "TRAIN", "TRAINER"]

FLAG, NAT, POS, POS_OR_NULL = R(bool), R(int, ge=0), R(int, ge=1), R(int | None, ge=1)
SEED = R(int | None, ge=0)
PER_PROCESS = "per process; the global batch is × devices × num_nodes"
SAME_PADDING = "same padding keeps the code grid"
SCHEDULERS = ("cosine", "none")


def _stages(v: list[str] | str) -> bool:
    names = v.strip("[]").split(",") if isinstance(v, str) else v
    return all(str(s).strip() in STAGE_ORDER for s in names if str(s).strip())


def _data(s: Settings) -> Iterator[tuple[str, Any, str]]:
    if s["grayscale"] and s["rgb"]:
        yield "rgb", True, "contradicts data.grayscale=true; choose one"


def _lca(s: Settings) -> Iterator[tuple[str, Any, str]]:
    if s["threshold"] == "cel0" and s["theta"] is not None and not 0 < s["theta"] < 1:
        yield "theta", s["theta"], "must be a finite number > 0 and < 1 (θ of the cel0 threshold)"


def _classify(s: Settings) -> Iterator[tuple[str, Any, str]]:
    for name, levels in (s["corruptions"] or {}).items():
        if name not in CORRUPTIONS:
            yield f"corruptions.{name}", levels, f"unknown corruption; known: {sorted(CORRUPTIONS)}"
        elif not (isinstance(levels, list) and all(is_number(v) and v >= 0 for v in levels)):
            yield f"corruptions.{name}", levels, "must be a list of levels ≥ 0"
    if None not in (s["main_frontend"], s["frontends"]) and s["main_frontend"] not in s["frontends"]:
        yield "main_frontend", s["main_frontend"], f"must be one of model.classify.frontends {s['frontends']}"


#: ``trainer`` and each ``model.<stage>.trainer``; accelerator, devices and strategy are for the preflight
TRAINER = Group(Target("pytorch_lightning.Trainer"), {
    "accelerator": R(Any), "devices": R(Any), "strategy": R(Any),
    "max_epochs": R(int | None, ge=1, also=(-1,)), "min_epochs": R(int | None, ge=0),
    "check_val_every_n_epoch": POS_OR_NULL, "log_every_n_steps": POS_OR_NULL,
    "num_sanity_val_steps": R(int | None, ge=-1), "accumulate_grad_batches": POS_OR_NULL,
    "gradient_clip_val": R(float | None, ge=0)})

#: ``eval`` (of an evaluate config, and read by a train config's report stage)
EVAL = Group(Yaml("eval", "all", free=("eval.thresholds.runs",)), {
    "modes": R(list[str], one_of=MODES, why="eval=all runs each one"),
    "split": R(str, one_of=SPLITS, what="split"), "n_images": POS_OR_NULL, "batch_size": POS,
    "iters": R(int | None, ge=1, why="the reference budget T"),
    "budgets": R(list[int], ge=1, nonempty=True), "ood.n_images": POS_OR_NULL,
    "denoise.sigmas": R(list[float], gt=0, le=1, why="σ on the [0, 1] pixel scale")})

#: ``logger`` and ``callbacks``: name -> null or an instantiable config
INSTANCES = Group(Instances(), {})

#: the top-level keys of ``eval.yaml``
EVAL_RUN = Group(Keys(), {
    "run_dir": R(str | None), "bundle": R(str | None), "sweep_dir": R(str | None), "seed": SEED,
    "progress": FLAG,
    "device": R(str | None, test=lambda v: v in ("auto", "cpu", "cuda", "mps") or (
        v.startswith("cuda:") and v[5:].isdigit()), say="must be auto, cpu, cuda, cuda:<n> or mps")})

#: every node of a train config (``""``: the top-level keys of ``train.yaml``)
TRAIN: dict[str, Group] = {
    "": Group(Keys(), {
        "stages": R(list[str] | str | None, test=_stages, say=f"unknown stage(s); valid stages: "
                    f"{list(STAGE_ORDER)} (e.g. stages=[dictionary,targets])"),
        "seed": SEED, "force": FLAG, "resume": FLAG, "skip_nonfinite_batches": FLAG, "print_metrics": FLAG,
        "optimized_metric": R(str | None, say="must be a metric name such as warp/val/state_r2 (or null)"),
        "dictionary_path": R(str | None, say="must be a path"),
        "warp_path": R(str | None, say="must be a path")}),
    "data": Group(Target(base="pytorch_lightning.LightningDataModule"), {
        "batch_size": R(int, ge=1, why=f"images {PER_PROCESS}"), "num_workers": NAT,
        "crop_size": POS_OR_NULL, "image_size": POS_OR_NULL, "n_train": POS, "n_val": POS, "n_test": POS,
        "seed": NAT, "split_seed": NAT,
        "scale": R(float, gt=0), "min_std": R(float, ge=0), "val_fraction": R(float, gt=0, lt=1),
        "grayscale": FLAG, "rgb": FLAG, "pin_memory": FLAG, "download": FLAG}, _data),
    "norm": Group(None, {
        "kind": R(str, one_of=KINDS, what="normalisation"), "scale": R(float | None, gt=0),
        "lowpass_lambda": R(float | None, gt=0), "lowpass_pad": R(int | None, ge=0),
        "eps": R(float | None, gt=0)}),
    "dictionary": Group(Target(base="warplca.lca.dictionary.ConvDictionary", provided=("in_channels",)), {
        "n_atoms": POS, "kernel_size": R(int, ge=1, odd=True, why="atoms are centred on their code position"),
        "stride": POS, "padding_mode": R(str, one_of=PADDING_MODES, what="padding mode"), "seed": SEED}),
    "lca": Group(Target("warplca.lca.solver.LCA", provided=("dictionary",)), {
        "threshold": R(str, one_of=THRESHOLDS, what="threshold"),
        "lam": R(float, ge=0, why="the threshold λ"),
        "tau": R(float | str, gt=0, one_of=("auto",), say="must be a number > 0 or 'auto'",
                 why="τ = ‖Φ‖²_op, the largest step with energy descent"),
        "iters": NAT, "nonneg": FLAG, "theta": R(float), "tol": R(float | None, gt=0), "check_every": POS,
        "backend": R(str, one_of=("polyphase", "direct"), what="backend"), "compile": FLAG}, _lca),
    "model.dictionary": Group(Target(provided=("dictionary", "lca_settings", "normalization"),
                                     extra=("trainer",)), {
        "lr": R(float, gt=0), "iters": R(int, ge=1, why="LCA steps per batch"), "test_iters": POS_OR_NULL,
        "optimizer": R(str | dict, test=lambda v: not isinstance(v, str) or v.lower() in ("adam", "sgd"),
                       say="unknown optimizer; known: adam, sgd (or a `_partial_: true` torch.optim config)"),
        "log_images_every_n_epochs": NAT, "n_log_images": NAT,
        "coherence_weight": R(float, ge=0, why="β of the coherence penalty"),
        "coherence_target": R(float, ge=0, why="the ‖Φ‖²_op below which the penalty is zero"),
        "resample_every": R(int, ge=0, why="training steps between dead-atom checks (0: never)"),
        "resample_fraction": R(float, ge=0, le=1), "resample_until": R(float, ge=0, le=1),
        "min_lr_ratio": R(float, ge=0, le=1),
        "lr_schedule": R(str, one_of=("cosine", "constant"), what="learning-rate schedule")}),
    "model.warp": Group(Target(provided=PIPELINE_KEYS, extra=DATA_KEYS), {
        "lr": R(float, gt=0), "weight_decay": R(float, ge=0),
        "scheduler": R(str | None, one_of=SCHEDULERS, what="scheduler"),
        "eval_iters": R(list[int], ge=0, nonempty=True, why="LCA budgets"), "lca_eval_every_n_epochs": POS,
        "energy_weight": R(float, ge=0, why="w of the energy term"), "energy_temperature": R(float, gt=0),
        "epochs": POS, "batch_size": R(int, ge=1, why=PER_PROCESS), "num_workers": NAT}),
    "model.warp.finetune": Group(None, {"epochs": NAT, "lr": R(float, gt=0),
                                        "energy_weight": R(float, ge=0, why="w of the energy term")}),
    "model.classify": Group(Target(provided=("frontend", "num_classes", "image_size", "conditions"),
                                   extra=STAGE_KEYS), {
        "backbone": R(str | dict, one_of=sorted(BACKBONES), what="backbone"), "lr": R(float, gt=0),
        "weight_decay": R(float, ge=0), "scheduler": R(str, one_of=SCHEDULERS, what="scheduler"),
        "label_smoothing": R(float, ge=0, lt=1),
        "frontends": R(list[str], one_of=sorted(FRONTENDS), nonempty=True),
        "lca_iters_cold": POS, "lca_iters_warm": NAT, "corruptions": R(dict | None), "corruption_seed": NAT,
        "cache_features": R(str | bool, one_of=("auto",), say="must be auto, true or false"),
        "cache_dtype": R(str, one_of=("float32", "float16", "bfloat16"), what="dtype"),
        "batch_size": POS_OR_NULL, "test_batch_size": POS_OR_NULL, "feature_batch_size": POS,
        "main_frontend": R(str | None), "epochs": POS}, _classify),
    "predictor": Group(Target(provided=("in_channels", "n_atoms", "stride")), {
        "width": POS, "depth": POS, "kernel_size": R(int, ge=1, odd=True, why=SAME_PADDING),
        "stem_kernel_size": R(int | None, ge=1, odd=True, why=SAME_PADDING), "use_drive": FLAG,
        "drive_mode": R(str, one_of=DRIVE_MODES, what="drive mode"),
        "activation": R(str, one_of=sorted(ACTIVATIONS), what="activation"),
        "drive_scale": R(float | str | None, gt=0, one_of=("auto",), say="must be a number > 0, auto or null",
                         why="the factor of the drive Φᵀx")}),
    "loss": Group(None, {"name": R(str, one_of=LOSSES, what="loss"),
                         "gamma": R(float | None, gt=0, why="the Laplacian scale γ")}),
    "targets": Group(Yaml("targets"), {
        "iters": R(int, ge=1, why="target_iters: cold-LCA steps per target"),
        "splits": R(list[str], one_of=SPLITS, test=lambda v: "train" in v,
                    say=f"must be a subset of {list(SPLITS)} that includes train"),
        "batch_size": POS, "chunk_size": POS, "limit": POS_OR_NULL, "num_workers": NAT,
        "solver": R(str | None, one_of=("cold", "continuation"), what="target solver"),
        "continuation.start_factor": R(float, ge=1, why="the first stage's λ factor"),
        "continuation.stages": POS, "continuation.anneal_frac": R(float, ge=0, le=1)}),
    "study": Group(Yaml("study", free=("study.levers.predictors",)), {
        "split": R(str, one_of=SPLITS, what="split"), "n_images": POS_OR_NULL, "iters": POS_OR_NULL,
        "budgets": R(list[int], ge=1), "batch_size": POS,
        "ablation.losses": R(list[str], one_of=LOSSES, nonempty=True),
        "ablation.inputs": R(list[str], one_of=tuple(INPUTS), nonempty=True), "ablation.epochs": POS_OR_NULL,
        "learning_curve.sizes": R(list[int], ge=1), "learning_curve.epochs": R(list[int], ge=1),
        "levers.augment": FLAG, "levers.self_distill": FLAG, "levers.epochs": POS_OR_NULL,
        "levers.energy_finetune.weights": R(list[float], ge=0), "levers.energy_finetune.epochs": POS,
        "levers.energy_finetune.lr": R(float, gt=0)}),
    "eval": EVAL,
    "trainer": TRAINER, "logger": INSTANCES, "callbacks": INSTANCES,
    **{f"model.{stage}.trainer": TRAINER for stage in ("dictionary", "warp", "classify")},
}
