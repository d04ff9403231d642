"""Stage "report": the convergence evaluation of the run's WARP-LCA bundle, ending the main job.

Runs cold LCA and WARP-LCA from ``warp_lca.pt`` (or ``warp_path``) on the test split
(:func:`~warplca.evaluation.experiments.eval_settings`), writes the convergence files and ``report.md``
(its artifact; plus the robustness, study and pipeline sections of stages that ran), logs them and
prints the cold LCA vs WARP-LCA table. Metrics: ``convergence/…``.
"""

from __future__ import annotations

import logging
import math

from warplca.evaluation.common import describe_model, load_model, resolve_device
from warplca.evaluation.convergence import table_markdown
from warplca.evaluation.experiments import eval_images, eval_settings, run_convergence
from warplca.evaluation.report import fmt, markdown_table, write_report_section, write_result
from warplca.evaluation.robustness import robustness_result
from warplca.serialization import REPORT_FILE, ROBUSTNESS_FILE, read_metrics
from warplca.tasks.context import RunContext, RunSettings
from warplca.tasks.utils import evaluation_device_name

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT", "run"]

ARTIFACT = REPORT_FILE
_STAGE_KEYS = ("dictionary", "targets", "warp", "classify")
#: sections written by the study stages (``<name>.md`` in the run directory)
STUDY_SECTIONS = ("ablation", "learning_curve", "levers")


def pipeline_section(ctx: RunContext) -> str:
    """report.md section: the other stages' metrics from metrics.json (what the run trained)."""
    data = read_metrics(ctx.run_dir)
    rows = [{"stage": stage, "metric": key, "value": float(value)} for stage in _STAGE_KEYS
            for key, value in sorted((data.get(stage) or {}).items())
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if not rows:
        return ""
    return ("## Pipeline\n\n<details><summary>Metrics of the training stages (metrics.json)</summary>\n\n"
            + markdown_table(rows, ["stage", "metric", "value"]) + "\n</details>\n")


def run(ctx: RunContext) -> dict[str, float]:
    """Evaluate convergence on the test split, write the report and print the closing table."""
    if not ctx.is_rank_zero:
        return {}
    settings = eval_settings(ctx.cfg)
    device = resolve_device(evaluation_device_name(ctx.cfg))  # where the trainer would run
    path = ctx.bundle_file()
    if not path.is_file():
        raise FileNotFoundError(f"report: no WARP-LCA bundle at {path}; run the warp stage first "
                                "(stages=[dictionary,targets,warp,report]) or pass warp_path=<file>")
    model = load_model(path, device)
    dm = ctx.datamodule
    split = str(settings["split"])
    images = eval_images(dm, model, split, settings.get("n_images"))
    name = f"{getattr(dm, 'name', 'data')}/{split}"
    log.info("report: cold LCA vs WARP-LCA on %d %s images, T=%s", images.shape[0], name,
             settings.get("iters") or model.lca.iters)
    result = run_convergence(model, images, settings, name=name,
                             show_progress=bool(ctx.cfg.get("progress", RunSettings.progress)),
                             device=device)
    results = [result]
    if ctx.artifact(ROBUSTNESS_FILE).is_file():  # the classify stage ran: report its table too
        results.append(robustness_result(ctx.run_dir))
    loggers = ctx.loggers("report")
    metrics: dict[str, float] = {}
    for res in results:  # report.md (the artifact) exists after the first
        write_result(res, ctx.run_dir, loggers, prefix="report")
        metrics.update(res.metrics)
    for lg in loggers:
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    for study in STUDY_SECTIONS:  # the warm-start study stages ran: their tables and plots
        if ctx.artifact(f"{study}.md").is_file():
            write_report_section(ctx.run_dir, study, ctx.artifact(f"{study}.md").read_text(encoding="utf-8"))
    pipeline = pipeline_section(ctx)
    if pipeline:
        write_report_section(ctx.run_dir, "pipeline", pipeline)

    info = describe_model(model)
    total = int(metrics["convergence/T"])
    print(f"\nCold LCA vs WARP-LCA — {images.shape[0]} {name} images, {info['threshold']} threshold, "
          f"λ = {fmt(info['lam'])}, T = {total}", flush=True)
    print(table_markdown(result.table, result.match), flush=True)
    ratio = metrics.get("convergence/energy_ratio@T", math.nan)
    print(f"Final energy ratio WARP-LCA / LCA at T={total}: {fmt(ratio, 6)}.  "
          f"Report: {ctx.artifact(ARTIFACT)}", flush=True)
    return metrics
