"""Shared pytest fixtures.

Section "training framework" (tasks/, conf/): composed train configs with outputs in ``tmp_path``,
wandb disabled for the whole session (no network), a headless matplotlib backend.
Other sections may be appended below by other test suites.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

# -- training framework ---------------------------------------------------------------------------
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["WANDB_MODE"] = "disabled"  # never touch the network; tests that need offline set it
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]

#: overrides that make the dictionary stage take seconds: tiny dictionary, few images, few LCA steps
TINY_OVERRIDES: tuple[str, ...] = (
    "stages=[dictionary]",
    "dictionary=tiny",
    "data.n_train=64",
    "data.n_val=32",
    "data.n_test=32",
    "data.batch_size=32",
    "model.dictionary.iters=10",
    "model.dictionary.test_iters=10",
    "model.dictionary.trainer.max_epochs=1",
    "lca.iters=20",
    "predictor=small",
    "model.warp.finetune.epochs=0",
)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., object]:
    """``make_cfg(*overrides, output_dir=None)``: a composed train config writing into ``tmp_path``.

    ``${hydra:...}`` interpolations resolve (the Hydra node is registered); outputs go to
    ``tmp_path / "run"`` unless ``output_dir`` is given. ``tiny=True`` prepends TINY_OVERRIDES (their
    natural-only ``data.n_*`` keys are dropped when another dataset is chosen).
    """
    from warplca.config import compose_config

    def make(*overrides: str, output_dir: str | os.PathLike | None = None, tiny: bool = True,
             config_name: str = "train") -> object:
        out = Path(output_dir) if output_dir is not None else tmp_path / "run"
        other_data = any(o.startswith("data=") and o != "data=natural" for o in overrides)
        base = [o for o in TINY_OVERRIDES if not (other_data and o.startswith("data.n_"))] if tiny else []
        ov: Sequence[str] = (*base, *overrides)
        return compose_config(list(ov), output_dir=out, config_name=config_name)

    return make


@pytest.fixture
def cfg_train(make_cfg: Callable[..., object]) -> object:
    """The tiny dictionary-stage config with outputs in ``tmp_path / "run"``."""
    return make_cfg()
