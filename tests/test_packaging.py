"""Packaging: the top-level Hydra configs ship inside the wheel and the console commands are declared.

The wheel is built from a copy of the project (``src/``, ``conf/``, ``pyproject.toml``, ``setup.py``,
``README.md``) in ``tmp_path`` so that no ``build/`` directory appears in the working tree;
``--no-build-isolation``
uses the installed setuptools, so nothing is downloaded.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import warplca
from warplca.config import default_config_dir

REPO = Path(__file__).resolve().parents[1]


def test_source_checkout_reads_the_top_level_conf() -> None:
    conf = default_config_dir()
    assert conf == REPO / "conf"
    assert (conf / "train.yaml").is_file() and (conf / "eval.yaml").is_file()
    package = Path(warplca.__file__).resolve().parent
    assert not (package / "conf").exists(), "conf/ is the single copy; src/warplca/conf is stale"


def test_cli_entry_points_use_the_package_configs() -> None:
    from warplca import cli

    assert callable(cli.train_main) and callable(cli.eval_main)
    assert Path(cli._CONF) == default_config_dir()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    src = root / "project"
    shutil.copytree(REPO / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    shutil.copytree(REPO / "conf", src / "conf")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = root / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = sorted(out.glob("warplca-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_every_config(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "warplca/conf/train.yaml" in names and "warplca/conf/eval.yaml" in names
    assert "warplca/cli.py" in names
    expected = {"warplca/conf/" + p.relative_to(default_config_dir()).as_posix()
                for p in default_config_dir().rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)


def test_wheel_declares_the_console_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        ep_files = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert len(ep_files) == 1
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(ep_files[0]).decode())
    scripts = dict(parser["console_scripts"])
    assert scripts["warplca-train"] == "warplca.cli:train_main"
    assert scripts["warplca-eval"] == "warplca.cli:eval_main"
