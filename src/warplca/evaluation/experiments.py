"""The experiments as the ``evaluate`` command and the pipeline's ``report`` stage run them.

Both read their settings through :func:`eval_settings` (the ``eval`` node over the YAML defaults of
``conf/eval/``), take their images through :func:`eval_images` and run the convergence experiment
through :func:`run_convergence`, so the main job's closing table and ``python evaluate.py`` agree.
:func:`robustness_result` turns the classify stage's ``robustness.csv`` into a report section.

Library code (stages, the study) imports from here, never from the command module
:mod:`warplca.tasks.evaluate`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.config_defaults import option_defaults
from warplca.evaluation.common import EvalModel, ExperimentResult, load_images

log = logging.getLogger(__name__)

__all__ = ["MODES", "eval_images", "eval_settings", "robustness_result", "run_convergence"]

#: the experiments ``eval.modes`` may name, in report order (each has an option ``conf/eval/<mode>.yaml``)
MODES = ("convergence", "thresholds", "denoise", "ood", "robustness")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _plain(node: Any) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _resolved(cfg: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (YAML defaults that may hold ``${seed}`` & co.) resolved against the config ``cfg``."""
    if not isinstance(cfg, DictConfig):
        return values
    root = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "eval"])
    OmegaConf.set_readonly(root, False)
    OmegaConf.set_struct(root, False)
    root["eval"] = values
    out = OmegaConf.to_container(root["eval"], resolve=True)
    assert isinstance(out, dict)
    return out


def eval_settings(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The evaluation settings of ``cfg`` as plain Python, with the YAML as the only source of defaults.

    The shared settings and the ``convergence`` section come from ``conf/eval/convergence.yaml`` (with
    ``common.yaml``), the ``eval`` node of ``cfg`` (if any; the train config has none unless given) merged
    over them; ``modes`` is only what the node names. The section of each other mode in ``modes``
    (``thresholds``, ``denoise``, ``ood``) is the node's, keys it leaves out taken from that mode's own
    ``conf/eval/<mode>.yaml``.
    """
    settings = option_defaults("eval", "convergence")
    settings.pop("modes", None)
    node = cfg.get("eval") if cfg is not None and hasattr(cfg, "get") else None
    if node is not None:
        settings = _merge(settings, _plain(node))
    for mode in [str(m) for m in settings.get("modes") or []]:
        if mode == "convergence" or mode not in MODES:
            continue
        section = option_defaults("eval", mode).get(mode)
        if isinstance(section, dict):
            settings[mode] = {**_resolved(cfg, section), **(settings.get(mode) or {})}
    return settings


def eval_images(dm: Any, model: EvalModel, split: str, n_images: int | None) -> Any:
    """The first ``n_images`` of ``split``, channels matched to the model (grey -> RGB, RGB -> luminance)."""
    from warplca.evaluation.ood import match_channels

    images = load_images(dm, split, n_images)
    images, note = match_channels(images, model.dictionary.in_channels)
    if note:
        log.warning("evaluation data: %s", note)
    return images


def run_convergence(
    model: EvalModel,
    images: Any,
    out_dir: Path,
    settings: Mapping[str, Any],
    name: str = "",
    show_progress: bool = True,
    device: Any = None,
) -> Any:
    """Experiment 1 with the :func:`eval_settings` ``settings`` (T defaults to the bundle's ``lca.iters``)."""
    from warplca.evaluation.convergence import TimingSettings, evaluate_convergence

    conv = settings["convergence"]
    total = int(settings.get("iters") or model.lca.iters)
    ex = conv["examples"]
    return evaluate_convergence(
        model,
        images,
        out_dir,
        iters=total,
        ks=conv.get("ks"),
        budgets=settings["budgets"],
        batch_size=int(settings["batch_size"]),
        timing=TimingSettings(**conv["timing"]),
        examples=int(ex["images"]),
        examples_iters=int(ex["iters"]),
        name=name,
        show_progress=show_progress,
        device=device,
    )


def robustness_result(run_dir: Path, out_dir: Path) -> ExperimentResult:
    """Experiment 5 as a report section: the classify stage's ``robustness.csv`` (accuracy per front end,
    corruption and level; micro-averaged: correct / images) as a markdown table, mean corruption
    accuracies and the plot.

    Classification is not re-run here (it needs the trained classifier); without the CSV the section says so.
    """
    from warplca.evaluation import robustness as rb

    csv_path = run_dir / "robustness.csv"
    if not csv_path.is_file():
        note = (
            f"no `{csv_path.name}` in `{run_dir}`: run the classify stage first "
            "(`python train.py run_dir=<run> stages=[classify]`)."
        )
        return ExperimentResult(
            name="robustness", markdown=f"## Noisy classification\n\n{note}\n", notes=[note]
        )
    rows = rb.read_robustness_csv(csv_path)
    files: dict[str, Path] = {}
    plot = out_dir / "robustness.png"
    if not plot.is_file():
        rb.save_robustness_plot(rows, plot)
    files["plot"] = plot
    metrics: dict[str, float] = {}
    for frontend, summary in rb.robustness_summary(rows).items():
        for key, value in summary.items():
            metrics[f"robustness/{frontend}/{key}"] = float(value)
    md = rb.robustness_markdown(rows).rstrip() + f"\n\n![noisy classification]({plot.name})\n"
    columns = list(rb.CSV_COLUMNS)
    return ExperimentResult(
        name="robustness",
        metrics=metrics,
        markdown=md,
        files=files,
        tables={"robustness/accuracy": (columns, [dict(r) for r in rows])},
    )
