"""The evaluation task: ``evaluate(cfg)`` runs the paper's experiments on a trained run (DESIGN §6–7).

``python evaluate.py run_dir=<dir> eval=convergence|thresholds|denoise|ood|all`` loads the run's
``warp_lca.pt``, takes images from the run's own data config (or ``data=<name>``), runs each
experiment of ``eval.modes`` and writes into ``out_dir`` (default ``run_dir``): ``metrics.json``
(merged under ``"eval"``), CSV tables, PNG plots and one ``report.md`` section per experiment; the same
scalars, images and tables go to the configured loggers. ``sweep_dir=<multirun dir>`` builds a sweep
summary instead; ``results_md=<file>`` writes a README-ready results page from the run's report.md.

The pipeline's ``report`` stage (:mod:`warplca.tasks.stage_report`) reuses :func:`convergence_settings`
and :func:`run_convergence`, so the main job's closing table and ``evaluate.py`` agree.
"""

from __future__ import annotations

import copy
import logging
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.evaluation.common import (
    EvalModel,
    ExperimentResult,
    build_datamodule_from_config,
    load_images,
    load_model,
    resolve_device,
    run_data_config,
)
from warplca.evaluation.report import log_to_loggers, merge_metrics, write_report_section, write_results_page
from warplca.tasks.utils import instantiate_loggers, seed_everything, task_wrapper, to_container

log = logging.getLogger(__name__)

__all__ = ["MODES", "convergence_settings", "eval_images", "evaluate", "robustness_result", "run_convergence"]

MODES = ("convergence", "thresholds", "denoise", "ood", "robustness")

#: the eval settings used when a config has no ``eval`` node (e.g. the report stage of train.yaml)
DEFAULTS: dict[str, Any] = {
    "split": "test",
    "n_images": 64,
    "batch_size": 64,
    "iters": None,
    "budgets": [1, 10, 100, 1000],
    "convergence": {
        "ks": None,
        "timing": {"images": 32, "repeats": 3, "max_seconds": 10.0, "enabled": True},
        "examples": {"images": 6, "iters": 10},
    },
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def convergence_settings(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``eval`` node of ``cfg`` (if any) over :data:`DEFAULTS`, as plain Python."""
    node = None
    if cfg is not None:
        node = cfg.get("eval") if hasattr(cfg, "get") else None
    return _merge(DEFAULTS, to_container(node) if node is not None else None)


def _describe_data(dm: Any, split: str) -> str:
    return f"{getattr(dm, 'name', type(dm).__name__)}/{split}"


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
    """Experiment 1 with the ``eval`` settings (T defaults to the bundle's ``lca.iters``)."""
    from warplca.evaluation.convergence import TimingSettings, evaluate_convergence

    conv = settings.get("convergence", {})
    total = int(settings.get("iters") or model.lca.iters)
    timing = TimingSettings(**conv.get("timing", {}))
    ex = conv.get("examples", {})
    return evaluate_convergence(
        model,
        images,
        out_dir,
        iters=total,
        ks=conv.get("ks"),
        budgets=settings["budgets"],
        batch_size=int(settings["batch_size"]),
        timing=timing,
        examples=int(ex.get("images", 6)),
        examples_iters=int(ex.get("iters", 10)),
        name=name,
        show_progress=show_progress,
        device=device,
    )


def robustness_result(run_dir: Path, out_dir: Path) -> ExperimentResult:
    """Experiment 5 as a report section: the classify stage's ``robustness.csv`` (accuracy per front end,
    corruption and level) as a markdown table, mean corruption accuracies and the plot.

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


def _data_config(cfg: DictConfig, run_dir: Path | None) -> tuple[Any, str]:
    """``cfg.data`` if given, else the run's saved data config, else the embedded natural images."""
    if cfg.get("data") is not None:
        return cfg.data, "data=… override"
    paths: dict[str, Any] = {}
    try:
        paths = to_container(cfg.get("paths")) or {}
    except Exception:  # ${hydra:…} outside a Hydra app
        log.debug("eval paths not resolvable; the run's data config must not need them")
    return run_data_config(run_dir, paths, int(cfg.get("seed", 0)))


class _Session:
    """Per-invocation state: config, directories, device, model, images and loggers (built lazily)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.settings = convergence_settings(cfg)
        bundle = cfg.get("bundle")
        run_dir = cfg.get("run_dir")
        if not run_dir and not bundle:
            raise ValueError(
                "evaluate.py needs run_dir=<training run directory> (or bundle=<warp_lca.pt>), "
                "or sweep_dir=<multirun directory> for a sweep summary"
            )
        self.run_dir = Path(run_dir).expanduser() if run_dir else Path(bundle).expanduser().parent
        self.out_dir = Path(cfg.get("out_dir") or self.run_dir).expanduser()
        self.device = resolve_device(cfg.get("device", "auto"))
        self.show_progress = bool(cfg.get("progress", True))
        self._model: EvalModel | None = None
        self._images: Any = None
        self.data_name = ""
        self.loggers: list[Any] = []

    @property
    def model(self) -> EvalModel:
        if self._model is None:
            self._model = load_model(self.cfg.get("bundle") or self.run_dir, self.device)
        return self._model

    @property
    def images(self) -> Any:
        if self._images is None:
            data_cfg, source = _data_config(self.cfg, self.run_dir)
            dm = build_datamodule_from_config(data_cfg)
            split = str(self.settings["split"])
            self._images = eval_images(dm, self.model, split, self.settings.get("n_images"))
            self.data_name = _describe_data(dm, split)
            log.info(
                "evaluation images: %d × %s from %s (data config: %s)",
                self._images.shape[0],
                tuple(self._images.shape[1:]),
                self.data_name,
                source,
            )
        return self._images

    def total(self, override: Any = None) -> int:
        return int(override or self.settings.get("iters") or self.model.lca.iters)

    # -- experiments ----------------------------------------------------------------------------
    def convergence(self) -> ExperimentResult:
        return run_convergence(
            self.model,
            self.images,
            self.out_dir,
            self.settings,
            name=self.data_name,
            show_progress=self.show_progress,
            device=self.device,
        )

    def thresholds(self) -> ExperimentResult:
        from warplca.evaluation.common import describe_model
        from warplca.evaluation.thresholds import evaluate_thresholds, load_threshold_models

        conf = self.settings.get("thresholds") or {}
        models, notes = load_threshold_models(conf.get("runs") or {}, self.device)
        if conf.get("include_main", True):
            label = f"{describe_model(self.model)['threshold']} (this run)"
            models = {label: self.model, **models}
        if not models:
            raise FileNotFoundError("eval=thresholds: no bundle found. " + " ".join(notes))
        return evaluate_thresholds(
            models,
            self.images,
            self.out_dir,
            iters=self.total(conf.get("iters")),
            budgets=self.settings["budgets"],
            batch_size=int(self.settings["batch_size"]),
            notes=notes,
            show_progress=self.show_progress,
            device=self.device,
        )

    def denoise(self) -> ExperimentResult:
        from warplca.evaluation.denoise import evaluate_denoise

        conf = self.settings.get("denoise") or {}
        return evaluate_denoise(
            self.model,
            self.images,
            self.out_dir,
            sigmas=conf.get("sigmas", (0.05, 0.1, 0.2)),
            budgets=conf.get("budgets", (10, 100, 1000)),
            batch_size=int(self.settings["batch_size"]),
            seed=int(self.cfg.get("seed", 0)),
            examples=int(conf.get("examples", 4)),
            show_progress=self.show_progress,
            device=self.device,
        )

    def robustness(self) -> ExperimentResult:
        return robustness_result(self.run_dir, self.out_dir)

    def ood(self) -> ExperimentResult:
        from warplca.evaluation.ood import OODSource, evaluate_ood

        conf = self.settings.get("ood") or {}
        sources = [OODSource.from_config(s) for s in conf.get("sources") or []]
        n = int(conf.get("n_images") or self.settings.get("n_images") or 32)
        reference_images = self.images  # loads the run's data (and names it) first
        reference = (
            (f"{self.data_name or 'run data'} (in distribution)", reference_images)
            if conf.get("reference", True)
            else None
        )
        return evaluate_ood(
            self.model,
            sources,
            self.out_dir,
            iters=self.total(conf.get("iters")),
            budgets=self.settings["budgets"],
            n_images=n,
            batch_size=int(self.settings["batch_size"]),
            reference=reference,
            show_progress=self.show_progress,
            device=self.device,
        )


def _loggers(cfg: DictConfig, out_dir: Path, run_name: str) -> list[Any]:
    """The ``logger`` group's loggers writing under ``out_dir`` (file loggers in ``<logger>/eval/``)."""
    if cfg.get("logger") is None:
        return []
    local = copy.deepcopy(cfg)
    OmegaConf.update(local, "paths.output_dir", str(out_dir.resolve()), force_add=True)
    loggers = instantiate_loggers(
        local.get("logger"), version="eval", run_name=f"{run_name}/eval", run_group=f"evaluate/{run_name}"
    )
    try:
        params = OmegaConf.to_container(local, resolve=True)
        assert isinstance(params, dict)
        params.pop("hydra", None)
        for lg in loggers:
            lg.log_hyperparams(params)
    except Exception as exc:  # hyperparameters are a nicety; results are not
        log.debug("could not log hyperparameters: %s", exc)
    return loggers


def publish(
    result: ExperimentResult, out_dir: Path, loggers: list[Any], section: str = "eval", echo: bool = True
) -> None:
    """Write a result's report.md section and metrics.json entries, send it to the loggers, print it."""
    write_report_section(out_dir, result.name, result.markdown)
    merge_metrics(out_dir, result.metrics, section=section)
    images = {
        f"{section}/{result.name}/{key.replace(':', '_')}": path
        for key, path in result.files.items()
        if path.suffix == ".png"
    }
    log_to_loggers(
        loggers,
        {f"{section}/{k}": v for k, v in result.metrics.items()},
        images=images,
        tables={f"{section}/{k}": v for k, v in result.tables.items()},
        text={f"{section}/{result.name}/report": result.markdown},
    )
    if echo:
        print("\n" + result.markdown, flush=True)


def command_line() -> str:
    """The command that is running (``python evaluate.py …``), for reports that say how to regenerate them."""
    argv = [a for a in sys.argv[1:]]
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "evaluate.py"
    if script not in ("evaluate.py", "train.py"):
        script = "evaluate.py"
    return "python " + " ".join([script, *map(shlex.quote, argv)])


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the evaluations of ``cfg.eval.modes`` (or a sweep summary); returns flat ``eval/…`` metrics."""
    from warplca.config_validation import validate_eval_config

    validate_eval_config(cfg)  # every problem at once, before anything loads
    seed_everything(cfg.get("seed"))
    if cfg.get("sweep_dir"):
        from warplca.evaluation.sweep import summarize_sweep

        result = summarize_sweep(cfg.sweep_dir, cfg.get("out_dir"), cfg.get("sweep_metrics"))
        print("\n" + result.markdown, flush=True)
        return {k: float(v) for k, v in result.metrics.items()}

    session = _Session(cfg)
    modes = [str(m) for m in (session.settings.get("modes") or [])]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(
            f"unknown eval mode(s) {unknown}; choose from {list(MODES)} (eval=all runs every one)"
        )
    session.out_dir.mkdir(parents=True, exist_ok=True)
    loggers = _loggers(cfg, session.out_dir, session.run_dir.name) if modes else []
    metrics: dict[str, float] = {}
    for mode in modes:
        log.info("evaluation %s: starting (results in %s)", mode, session.out_dir)
        result: ExperimentResult = getattr(session, mode)()
        publish(result, session.out_dir, loggers)
        metrics.update({f"eval/{k}": float(v) for k, v in result.metrics.items()})
    for lg in loggers:
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    if cfg.get("results_md"):
        page = write_results_page(session.out_dir, cfg.results_md, command=command_line())
        log.info("results page written to %s", page)
        print(f"results page: {page}", flush=True)
    return metrics
