"""The experiments as the ``evaluate`` command and the pipeline's ``report`` stage run them.

Both take settings from :func:`eval_settings`, images from :func:`eval_images` and the convergence
experiment from :func:`run_convergence`, so the main job's closing table and ``python evaluate.py``
agree. Library code imports from here, never from the command module :mod:`warplca.tasks.evaluate`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.config_defaults import option_defaults
from warplca.evaluation.common import EvalModel, _plain, load_images

log = logging.getLogger(__name__)

__all__ = ["MODES", "eval_images", "eval_settings", "run_convergence"]

#: the experiments ``eval.modes`` may name, in report order (each has an option ``conf/eval/<mode>.yaml``)
MODES = ("convergence", "thresholds", "denoise", "ood", "robustness")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    """``over`` merged into a deep copy of ``base``, recursively."""
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


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

    ``cfg``'s ``eval`` node (if any) is merged over ``conf/eval/convergence.yaml``; ``modes`` is only what
    the node names, and each other mode's section takes the keys it leaves out from ``conf/eval/<mode>.yaml``.
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

    images, note = match_channels(load_images(dm, split, n_images), model.dictionary.in_channels)
    if note:
        log.warning("evaluation data: %s", note)
    return images


def run_convergence(model: EvalModel, images: Any, settings: Mapping[str, Any], name: str = "",
                    show_progress: bool = True, device: Any = None) -> Any:
    """Experiment 1's ``ConvergenceResult`` with the :func:`eval_settings` ``settings`` (T: ``lca.iters``)."""
    from warplca.evaluation.convergence import TimingSettings, measure_convergence

    conv = settings["convergence"]
    return measure_convergence(
        model, images, iters=int(settings.get("iters") or model.lca.iters), ks=conv.get("ks"),
        budgets=settings["budgets"], batch_size=int(settings["batch_size"]),
        timing=TimingSettings(**conv["timing"]), examples=int(conv["examples"]["images"]),
        examples_iters=int(conv["examples"]["iters"]), name=name, show_progress=show_progress, device=device)
