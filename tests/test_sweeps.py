"""Sweeps: a Hydra multirun puts every job in its own directory, records failing jobs and goes on, writes
nothing outside the sweep directory, and its summary shows the failures; the cluster / Optuna configs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from warplca.config import default_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = default_config_dir()

#: tiny dictionary-stage jobs (a few seconds each)
TINY = ("stages=[dictionary]", "dictionary=tiny", "data.n_train=32", "data.n_val=16", "data.n_test=16",
        "data.batch_size=16", "model.dictionary.iters=5", "model.dictionary.trainer.max_epochs=1",
        "model.dictionary.test_iters=5", "lca.iters=5", "logger=csv", "callbacks.model_summary=null")


def _run(args: list[str], cwd: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    """``python <args>`` with a fresh HOME (to catch stray files) but the usual matplotlib cache."""
    import matplotlib

    full_env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "1",
                "HOME": str(home), "PYTHONWARNINGS": "ignore", "MPLCONFIGDIR": matplotlib.get_configdir(),
                **env}
    full_env.pop("WANDB_DIR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=900)


def _stray(home: Path) -> list[str]:
    """Files under HOME other than tool caches and logs (matplotlib's font cache, wandb's service debug
    logs in ~/.cache/wandb/logs): no run output (wandb runs, lightning_logs, outputs) may land there."""
    out = []
    for p in home.rglob("*"):
        rel = p.relative_to(home)
        if not p.is_file():
            continue
        tool_cache = rel.parts[0] in (".cache", ".config") and not (
            len(rel.parts) > 1 and rel.parts[1] == "wandb" and rel.parts[:3] != (".cache", "wandb", "logs"))
        if not tool_cache:
            out.append(str(rel))
    return out


def test_multirun_2x2_with_failing_jobs_records_them_and_goes_on(tmp_path: Path) -> None:
    """lca.lam = -1 (invalid: those 2 jobs fail, first), 0.25, 0.5  ×  model.dictionary.lr = 0.01, 0.02."""
    from warplca.evaluation.sweep import summarize_sweep
    from warplca.runtime import FAILED

    home, sweep = tmp_path / "home", tmp_path / "sweep"
    home.mkdir()
    res = _run([str(REPO / "train.py"), "-m", *TINY, "lca.lam=-1,0.25,0.5", "model.dictionary.lr=0.01,0.02",
                "optimized_metric=dictionary/test/psnr", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, home=home)
    assert res.returncode == 0, res.stderr[-4000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == [str(i) for i in range(6)]
    failed = [p for p in jobs if (p / FAILED).is_file()]
    ok = [p for p in jobs if (p / "metrics.json").is_file()]
    assert [p.name for p in failed] == ["0", "1"] and [p.name for p in ok] == ["2", "3", "4", "5"]
    for job in failed:
        text = (job / FAILED).read_text()
        first = text.splitlines()[0]
        assert first.startswith("ConfigError: 1 problem: lca.lam=-1: must be") and "Traceback" in text
        assert not (job / "dictionary.pt").exists()
    for job in ok:
        assert (job / "dictionary.pt").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        assert (job / "csv" / "dictionary" / "metrics.csv").is_file()
    overrides = {tuple(yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text())) for j in ok}
    assert len(overrides) == 4  # each job its own point of the grid
    assert "failed" in res.stderr.lower() or "failed" in (jobs[0] / "train.log").read_text().lower()
    # nothing outside the sweep directory: cwd and HOME stay clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "sweep"]
    assert _stray(home) == []
    # the sweep summary (what `python evaluate.py sweep_dir=...` writes) shows the failed rows
    summary = summarize_sweep(sweep)
    with open(summary.files["csv"]) as fh:
        rows = {r["job"]: r for r in csv.DictReader(fh)}
    assert [rows[str(i)]["status"] for i in range(6)] == ["failed"] * 2 + ["ok"] * 4
    assert "lca.lam=-1" in rows["0"]["error"]
    assert summary.metrics["sweep/failed"] == 2.0


def test_task_wrapper_records_a_failure_and_finishes_wandb_in_a_multirun(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: the job raises after opening a wandb run; the wrapper writes FAILED, finishes the run and
    returns the failed marker metrics (NaN for a sweeper) instead of stopping the sweep."""
    import math

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from warplca.runtime import FAILED, FAILED_METRICS
    from warplca.tasks.utils import get_metric_value, task_wrapper

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    import wandb

    @task_wrapper
    def job(cfg) -> dict[str, float]:
        wandb.init(project="warp-lca-test", dir=str(tmp_path / "wandb"))
        raise RuntimeError("boom in the middle of a job")

    cfg = make_cfg(output_dir=tmp_path / "job")
    try:
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig().set_config(cfg)
        out = job(cfg)
        assert out == FAILED_METRICS
        assert math.isnan(get_metric_value(out, "dictionary/test/psnr"))
        assert wandb.run is None  # finished in the wrapper's finally
        marker = (tmp_path / "job" / FAILED).read_text()
        assert marker.startswith("RuntimeError: boom in the middle of a job")
        with open_dict(cfg):
            cfg.fail_fast = True
        with pytest.raises(RuntimeError, match="boom"):
            job(cfg)  # fail_fast: the sweep stops at the first failure
    finally:
        HydraConfig.instance().cfg = None
    # a single run (not a multirun) raises as usual, after writing the marker
    cfg = make_cfg(output_dir=tmp_path / "single")
    with pytest.raises(RuntimeError, match="boom"):
        job(cfg)
    assert (tmp_path / "single" / FAILED).is_file()
    assert wandb.run is None


# -------------------------------------------------------------------------------------------------
# cluster and search configs
# -------------------------------------------------------------------------------------------------


def test_slurm_launcher_config() -> None:
    raw = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert raw["defaults"] == ["submitit_slurm"]  # the plugin's schema
    for key in ("timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb",
                "signal_delay_s", "max_num_timeout", "array_parallelism", "submitit_folder"):
        assert key in raw, key
    assert (CONF / "hydra" / "launcher" / "slurm.yaml").read_text().startswith("# @package hydra.launcher")


def test_optuna_search_only_matters_when_selected(make_cfg) -> None:
    """Without the plugin every config composes; selecting the search needs it (and says so)."""
    from hydra.errors import HydraException

    raw = yaml.safe_load((CONF / "hparams_search" / "optuna_lam_gamma.yaml").read_text())
    params = raw["hydra"]["sweeper"]["params"]
    assert set(params) == {"lca.lam", "loss.gamma"} and raw["optimized_metric"]
    default = make_cfg(tiny=False)  # no search selected: Hydra's basic sweeper, no optuna parameters
    assert default.hydra.runtime.choices["hparams_search"] is None
    assert default.hydra.runtime.choices["hydra/sweeper"] == "basic" and not default.hydra.sweeper.params
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        with pytest.raises(HydraException, match="optuna"):
            make_cfg("hparams_search=optuna_lam_gamma", tiny=False)
    else:
        cfg = make_cfg("hparams_search=optuna_lam_gamma", tiny=False)
        assert cfg.hydra.sweeper.direction == "minimize"


@pytest.mark.parametrize("search", ["lam", "gamma", "iters"])
def test_basic_searches_compose(make_cfg, search: str) -> None:
    cfg = make_cfg(f"hparams_search={search}", tiny=False)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params


@pytest.mark.slow
def test_multirun_jobs_get_their_own_finished_wandb_runs(tmp_path: Path) -> None:
    """logger=many with WANDB_MODE=offline: one offline wandb run per job, inside that job's directory."""
    home, sweep = tmp_path / "home", tmp_path / "sweep"
    home.mkdir()
    res = _run([str(REPO / "train.py"), "-m", *[a for a in TINY if a != "logger=csv"], "logger=many",
                "lca.lam=0.25,0.5", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, home=home,
               WANDB_MODE="offline", WANDB_CONSOLE="off")
    assert res.returncode == 0, res.stderr[-4000:]
    run_ids = []
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"job {job}: {runs}"
        run_ids.append(runs[0].name.rsplit("-", 1)[-1])
    assert run_ids[0] != run_ids[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "sweep"]
    assert _stray(home) == []
    summary = _run([str(REPO / "evaluate.py"), f"sweep_dir={sweep}", f"hydra.run.dir={sweep / 'summary'}"],
                   cwd=tmp_path, home=home)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert (sweep / "sweep_summary.csv").is_file()


@pytest.mark.slow
def test_gamma_by_target_iters_sweep_end_to_end(tmp_path: Path) -> None:
    """A 2×2 multirun over γ and target_iters, targets → warp on a given dictionary (embedded data)."""
    from warplca import ConvDictionary
    from warplca.data import NaturalDataModule

    dm = NaturalDataModule(n_train=32, n_val=16, n_test=16, batch_size=16, seed=0)
    ConvDictionary(8, 3, 5, 2, seed=0).save(tmp_path / "d.pt", normalization=dm.normalization.to_dict())
    home, sweep = tmp_path / "home", tmp_path / "sweep"
    home.mkdir()
    args = [str(REPO / "train.py"), "-m", "stages=[targets,warp]", f"dictionary_path={tmp_path / 'd.pt'}",
            "data.n_train=32", "data.n_val=16", "data.n_test=16", "data.batch_size=16", "lca.iters=10",
            "targets.limit=null", "targets.chunk_size=16", "targets.batch_size=16", "model.warp.epochs=1",
            "model.warp.finetune.epochs=0",
            "model.warp.batch_size=16", "model.warp.eval_iters=[0,5]", "predictor.width=8",
            "predictor.depth=1", "logger=csv", "loss.gamma=1.0,3.0", "targets.iters=5,10",
            f"hydra.sweep.dir={sweep}"]
    res = _run(args, cwd=tmp_path, home=home)
    assert res.returncode == 0, res.stderr[-4000:]
    for job in ("0", "1", "2", "3"):
        assert (sweep / job / "warp_lca.pt").is_file() and (sweep / job / "targets" / "COMPLETE").is_file()
    from warplca.evaluation.sweep import summarize_sweep

    summary = summarize_sweep(sweep)
    assert summary.metrics["sweep/jobs"] == 4.0 and summary.metrics["sweep/failed"] == 0.0
    assert (sweep / "sweep_loss.gamma.png").is_file() and (sweep / "sweep_targets.iters.png").is_file()


def test_a_two_parameter_sweep_gets_a_map_and_pivot_tables(tmp_path: Path) -> None:
    """λ × norm: every cell of the pivot holds its own job's metric; a missing job is a NaN cell."""
    import json

    from warplca.evaluation.sweep import find_jobs, pivot, read_job, summarize_sweep

    cells = {(0.1, "image_mean"): 40.0, (0.4, "image_mean"): 400.0, (0.1, "dataset_mean"): 90.0}
    for n, ((lam, norm), value) in enumerate(cells.items()):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lca.lam={lam}", f"norm={norm}"]))
        metrics = {"report": {"convergence": {"iterations_to_match": value}}}
        (job / "metrics.json").write_text(json.dumps(metrics))
    jobs = [read_job(p) for p in find_jobs(tmp_path)]
    rows, cols, grid = pivot(jobs, "lca.lam", "norm", "report/convergence/iterations_to_match")
    assert rows == [0.1, 0.4] and cols == ["image_mean", "dataset_mean"]
    assert grid[0].tolist() == [40.0, 90.0] and grid[1, 0] == 400.0 and grid[1, 1] != grid[1, 1]

    result = summarize_sweep(tmp_path, metrics=["iterations_to_match"])
    assert (tmp_path / "sweep_map.png").stat().st_size > 0
    assert "Maps over lca.lam × norm" in result.markdown
    assert "| 0.4" in result.markdown and "400" in result.markdown
