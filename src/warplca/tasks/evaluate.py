"""The evaluation task: ``evaluate(cfg)`` runs the paper's experiments on a trained run.

``python evaluate.py run_dir=<dir> eval=convergence|thresholds|denoise|ood|all`` writes each
experiment's metrics, tables, plots and ``report.md`` section into ``out_dir`` (default ``run_dir``).
``sweep_dir=<multirun dir>`` summarises a sweep instead; ``results_md=<file>`` writes a results page.
Each mode of ``eval.modes`` is the evaluation registered under that name
(:func:`warplca.evaluation.experiments.evaluation`), run on one shared :class:`_Session`.
"""

from __future__ import annotations

import copy
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.evaluation.common import (
    EvalModel,
    ExperimentResult,
    build_datamodule_from_config,
    load_model,
    resolve_device,
    run_data_config,
)
from warplca.evaluation.experiments import EvalRunSettings, eval_images, eval_settings, get_evaluation
from warplca.evaluation.report import write_result, write_results_page
from warplca.tasks.utils import instantiate_loggers, seed_everything, task_wrapper, to_container

log = logging.getLogger(__name__)

__all__ = ["evaluate"]


class _Session:
    """Per-invocation state: config, directories, device, and the model and images (built lazily); the
    :class:`~warplca.evaluation.experiments.EvalSession` every evaluation mode runs on."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.settings = eval_settings(cfg)
        bundle = cfg.get("bundle")
        run_dir = cfg.get("run_dir")
        if not run_dir and not bundle:
            raise ValueError("evaluate.py needs run_dir=<training run directory> (or bundle=<warp_lca.pt>), "
                             "or sweep_dir=<multirun directory> for a sweep summary")
        self.run_dir = Path(run_dir).expanduser() if run_dir else Path(bundle).expanduser().parent
        self.out_dir = Path(cfg.get("out_dir") or self.run_dir).expanduser()
        self.device = resolve_device(cfg.get("device") or EvalRunSettings.device)
        self.show_progress = bool(cfg.get("progress", EvalRunSettings.progress))
        self._model: EvalModel | None = None
        self._images: Any = None
        self._datamodule: Any = None
        self.data_name = ""

    @property
    def model(self) -> EvalModel:
        if self._model is None:
            self._model = load_model(self.cfg.get("bundle") or self.run_dir, self.device)
        return self._model

    @property
    def images(self) -> Any:
        if self._images is None:
            split = str(self.settings["split"])
            self._images = self.split_images(split, self.settings.get("n_images"))
            log.info("evaluation images: %d × %s from %s", self._images.shape[0],
                     tuple(self._images.shape[1:]), self.data_name)
        return self._images

    def split_images(self, split: str, n_images: int | None) -> Any:
        """The first ``n_images`` of ``split`` of the evaluation data, channels matched to the model."""
        if self._datamodule is None:
            # cfg.data if given, else the run's saved data config, else the embedded natural images
            if self.cfg.get("data") is not None:
                data_cfg, source = self.cfg.data, "data=… override"
            else:
                paths: dict[str, Any] = {}
                try:
                    paths = to_container(self.cfg.get("paths")) or {}
                except Exception:  # ${hydra:…} outside a Hydra app
                    log.debug("eval paths not resolvable; the run's data config must not need them")
                data_cfg, source = run_data_config(self.run_dir, paths, int(self.cfg.get("seed") or 0))
            self._datamodule = build_datamodule_from_config(data_cfg)
            log.info("evaluation data config: %s", source)
        dm = self._datamodule
        self.data_name = f"{getattr(dm, 'name', type(dm).__name__)}/{self.settings['split']}"
        return eval_images(dm, self.model, split, n_images)

    def total(self, override: Any = None) -> int:
        """The reference budget T: ``override``, else ``eval.iters``, else the bundle's ``lca.iters``."""
        return int(override or self.settings.get("iters") or self.model.lca.iters)

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every ``measure_*`` experiment takes."""
        return {"batch_size": int(self.settings["batch_size"]), "show_progress": self.show_progress,
                "device": self.device}


def _loggers(cfg: DictConfig, out_dir: Path, run_name: str) -> list[Any]:
    """The ``logger`` group's loggers writing under ``out_dir`` (file loggers in ``<logger>/eval/``)."""
    if cfg.get("logger") is None:
        return []
    local = copy.deepcopy(cfg)
    OmegaConf.update(local, "paths.output_dir", str(out_dir.resolve()), force_add=True)
    loggers = instantiate_loggers(local.get("logger"), version="eval", run_name=f"{run_name}/eval",
                                  run_group=f"evaluate/{run_name}")
    try:
        params = OmegaConf.to_container(local, resolve=True)
        assert isinstance(params, dict)
        params.pop("hydra", None)
        for lg in loggers:
            lg.log_hyperparams(params)
    except Exception as exc:  # hyperparameters are a nicety; results are not
        log.debug("could not log hyperparameters: %s", exc)
    return loggers


def command_line() -> str:
    """The command that is running (``python evaluate.py …``), for reports that say how to regenerate them."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "evaluate.py"
    if script not in ("evaluate.py", "train.py"):
        script = "evaluate.py"
    return "python " + " ".join([script, *map(shlex.quote, sys.argv[1:])])


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the evaluations of ``cfg.eval.modes`` (or a sweep summary); returns flat ``eval/…`` metrics."""
    from warplca.config import validate_eval_config

    validate_eval_config(cfg)  # every problem at once, before anything loads
    seed_everything(cfg.get("seed"))
    if cfg.get("sweep_dir"):
        from warplca.evaluation.sweep import summarize_sweep

        result = summarize_sweep(cfg.sweep_dir, cfg.get("out_dir"), cfg.get("sweep_metrics"))
        print("\n" + result.markdown, flush=True)
        return {k: float(v) for k, v in result.metrics.items()}

    session = _Session(cfg)
    modes = [str(m) for m in (session.settings.get("modes") or [])]  # checked by validate_eval_config
    runs = [get_evaluation(mode) for mode in modes]  # every mode known before the first one runs
    session.out_dir.mkdir(parents=True, exist_ok=True)
    loggers = _loggers(cfg, session.out_dir, session.run_dir.name) if modes else []
    metrics: dict[str, float] = {}
    for evaluation in runs:
        log.info("evaluation %s: starting (results in %s)", evaluation.name, session.out_dir)
        result: ExperimentResult = evaluation.run(session)
        write_result(result, session.out_dir, loggers, prefix="eval", metrics_section="eval")
        print("\n" + result.markdown, flush=True)
        metrics.update({f"eval/{k}": float(v) for k, v in result.metrics.items()})
    for lg in loggers:
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    if cfg.get("results_md"):
        page = write_results_page(session.out_dir, cfg.results_md, command=command_line())
        log.info("results page written to %s", page)
        print(f"results page: {page}", flush=True)
    return metrics
