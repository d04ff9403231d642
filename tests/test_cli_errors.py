"""A known user error (missing dataset, bad config value, missing artifact) of ``python train.py`` prints its
message once, in a few lines, without a traceback, and exits non-zero; ``HYDRA_FULL_ERROR=1`` shows the
traceback. Called as a plain function (tests, notebooks) the task raises the original exception."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MISSING = "dataset files not found"


def _train(tmp_path: Path, *overrides: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_missing_dataset_prints_the_message_once_without_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "no_data"
    empty.mkdir()
    run = tmp_path / "run"
    proc = _train(tmp_path, "data=cifar10", "stages=[dictionary]", f"data.data_dir={empty}",
                  f"run_dir={run}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert out.count(MISSING) == 1, out
    assert "DatasetNotFoundError" in out and str(empty) in out and "data.download=true" in out
    assert "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 8, out  # a few lines, not two tracebacks
    # the traceback is kept in the job's FAILED marker (and HYDRA_FULL_ERROR=1 prints it)
    assert "Traceback" in (run / "FAILED").read_text()
    assert "HYDRA_FULL_ERROR=1" in out


def test_hydra_full_error_still_shows_the_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "no_data"
    empty.mkdir()
    proc = _train(tmp_path, "data=cifar10", "stages=[dictionary]", f"data.data_dir={empty}",
                  f"run_dir={tmp_path / 'run'}", full_error=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "DatasetNotFoundError" in out and MISSING in out


def test_a_bad_config_value_is_one_message_too(tmp_path: Path) -> None:
    proc = _train(tmp_path, "lca.iters=-3", f"run_dir={tmp_path / 'run'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("lca.iters=-3") == 1 and "Traceback" not in out, out


def test_called_as_a_function_the_task_raises_the_original_exception(make_cfg, tmp_path: Path) -> None:
    from warplca.data.datamodule import DatasetNotFoundError
    from warplca.tasks.train import train
    from warplca.tasks.utils import is_user_error

    empty = tmp_path / "no_data"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match=MISSING):
        train(make_cfg("data=cifar10", f"data.data_dir={empty}"))
    assert is_user_error(DatasetNotFoundError("x")) and is_user_error(ValueError("x"))
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))
