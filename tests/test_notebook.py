"""notebooks/quickstart.ipynb: stored without outputs, and it runs end to end on a tiny run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
DATA = {
    "_target_": "warplca.data.NaturalDataModule",
    "crop_size": 16,
    "n_train": 16,
    "n_val": 4,
    "n_test": 8,
    "batch_size": 8,
    "seed": "${seed}",
}


def test_notebook_is_stored_without_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.get("outputs") == [], "clear the outputs before committing the notebook"
        assert cell.get("execution_count") is None
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A run directory with a tiny bundle, its data config and a convergence evaluation (T = 10)."""
    from warplca.bundle import WarpLCA
    from warplca.data import NaturalDataModule
    from warplca.evaluation.convergence import TimingSettings, evaluate_convergence
    from warplca.lca import LCA, ConvDictionary
    from warplca.models.warp_cnn import WarpCNN

    run = tmp_path / "outputs" / "train" / "run"
    run.mkdir(parents=True)
    dm = NaturalDataModule(crop_size=16, n_train=16, n_val=4, n_test=8, batch_size=8)
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    torch.manual_seed(0)
    model = WarpLCA(
        d, WarpCNN(3, 8, 2, width=8, depth=2), LCA(d, lam=0.1, tau="auto", iters=10), dm.normalization
    )
    model.save(run / "warp_lca.pt", target_iters=10, dataset="natural")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": DATA}))
    evaluate_convergence(
        model,
        dm.tensor("test", 4)[0],
        run,
        iters=10,
        batch_size=4,
        timing=TimingSettings(images=2, repeats=1, max_seconds=0.1),
        examples=2,
        examples_iters=3,
        show_progress=False,
    )
    return run


@pytest.mark.timeout(300)
def test_notebook_runs_on_a_tiny_run(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("WARPLCA_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("WARPLCA_NB_EXAMPLES", "2")
    monkeypatch.setenv("WARPLCA_NB_ITERS", "3")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3, "convergence plot, examples figure and atom grid"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(tiny_run) in text
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and "WARP-LCA" in tables[0]["data"]["text/markdown"]
    # the stored notebook itself was not modified by the run
    assert all(
        c.get("outputs") == [] for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"
    )
