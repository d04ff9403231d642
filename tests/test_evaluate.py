"""evaluate.py and the report stage: every experiment writes valid files whose numbers agree with the API.

A tiny run directory (8 atoms 3×5×5 stride 2, an untrained WARP-CNN, 16×16 natural crops, T = 20
iterations) stands in for a trained one: the tests check plumbing and arithmetic, not claims.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
T = 20
DATA = {
    "_target_": "warplca.data.NaturalDataModule",
    "crop_size": 16,
    "n_train": 16,
    "n_val": 4,
    "n_test": 8,
    "batch_size": 8,
    "seed": "${seed}",
}
FAST = (
    "progress=false",
    "eval.convergence.timing.enabled=false",
    "eval.convergence.examples.images=3",
    "eval.convergence.examples.iters=5",
)


# -- helpers ---------------------------------------------------------------------------------------
def make_bundle(path: Path, threshold: str = "hard", lam: float = 0.1, seed: int = 0) -> Path:
    """A tiny, untrained WARP-LCA bundle with the natural images' normalisation."""
    from warplca.bundle import WarpLCA
    from warplca.data import NaturalDataModule
    from warplca.lca import LCA, ConvDictionary
    from warplca.models.warp_cnn import WarpCNN

    dm = NaturalDataModule(crop_size=16, n_train=16, n_val=4, n_test=8, batch_size=8)
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    lca = LCA(d, threshold=threshold, lam=lam, tau="auto", iters=T)
    torch.manual_seed(seed)
    model = WarpLCA(d, WarpCNN(3, 8, 2, width=8, depth=2), lca, dm.normalization)
    return model.save(path, target_iters=T, dataset="natural")


def make_run(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    make_bundle(path / "warp_lca.pt")
    (path / ".hydra").mkdir(exist_ok=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": DATA}))
    (path / "metrics.json").write_text(json.dumps({"dictionary": {"test/psnr": 20.0}}))
    return path


def run_eval(*overrides: str) -> dict[str, float]:
    from warplca.config import compose_config
    from warplca.tasks.evaluate import evaluate

    cfg = compose_config(list(overrides), config_name="eval")
    return evaluate(cfg)


def test_images() -> torch.Tensor:
    from warplca.data import NaturalDataModule

    kw = {k: v for k, v in DATA.items() if k != "_target_"} | {"seed": 0}
    return NaturalDataModule(**kw).tensor("test")[0]


test_images.__test__ = False  # a helper, not a test


def rows_of(path: Path) -> list[dict[str, str]]:
    from warplca.evaluation.report import read_csv

    return read_csv(path)


def check_png(path: Path, size: tuple[float, float] | None = None, dpi: int = 120) -> None:
    """A readable RGB(A) PNG, not blank, roughly ``size`` inches × ``dpi`` (bbox-tight crops a margin)."""
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 0, path
    arr = mpimg.imread(path)
    assert arr.ndim == 3 and arr.shape[2] in (3, 4), arr.shape
    assert float(arr[..., :3].std()) > 0.01, f"{path} looks blank"
    if size is not None:
        w, h = size[0] * dpi, size[1] * dpi
        assert 0.75 * w <= arr.shape[1] <= 1.15 * w, (path, arr.shape, w)
        assert 0.75 * h <= arr.shape[0] <= 1.15 * h, (path, arr.shape, h)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> Any:
    from warplca.bundle import WarpLCA

    return WarpLCA.load(tiny_run / "warp_lca.pt").eval()


@pytest.fixture(scope="module")
def conv_out(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """One convergence evaluation (with timing) into a copy of the run: (run dir, returned metrics)."""
    run = tmp_path_factory.mktemp("conv") / "run"
    shutil.copytree(tiny_run, run)
    metrics = run_eval(
        f"run_dir={run}",
        "progress=false",
        "eval=convergence",
        "eval.convergence.timing.images=4",
        "eval.convergence.timing.repeats=2",
        "eval.convergence.timing.max_seconds=0.5",
        "eval.convergence.examples.images=3",
        "eval.convergence.examples.iters=5",
    )
    return run, metrics


# -- pure pieces -----------------------------------------------------------------------------------
def test_log_spaced_ks() -> None:
    from warplca.evaluation.common import log_spaced_ks, normalize_ks

    ks = log_spaced_ks(1000)
    assert ks[0] == 0 and ks[-1] == 1000
    assert {1, 10, 100, 1000} <= set(ks) and ks == sorted(set(ks))
    assert log_spaced_ks(20) == [0, 1, 2, 3, 5, 10, 20]
    assert normalize_ks([7, 3], 9) == [0, 3, 7, 9]
    with pytest.raises(ValueError):
        normalize_ks([11], 9)


def test_segmented_run_equals_one_long_run(model: Any) -> None:
    """Restarting LCA from the previous states at every checkpoint is the same computation."""
    from warplca.evaluation.curves import run_curves

    images = test_images()
    x = model.preprocess(images)
    for warm in (False, True):
        curves = run_curves(
            model, images, [1, 2, 5, 10, T], warm=warm, batch_size=3, show_progress=False, keep=2, keep_ks=[T]
        )
        ref = model(x, iters=T, warm=warm, trace=True)
        assert curves.energy.shape == (T + 1, images.shape[0])
        torch.testing.assert_close(curves.energy, ref.trace["energy"].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(curves.l0, ref.trace["l0"].double())
        pixels = model.postprocess(ref.recon).clamp(0, 1)
        torch.testing.assert_close(curves.kept[T], pixels[:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(curves.kept_codes[T], ref.a[:2], rtol=1e-5, atol=1e-6)


def test_iterations_to_match_rules() -> None:
    from warplca.evaluation.curves import iterations_to_match

    cold = _curves([[9, 9, 9], [6, 6, 6], [5, 5, 4], [4, 4, 3]])  # T = 3: reference (4, 4, 3)
    warm = _curves([[8, 8, 8], [4, 7, 5], [3, 5, 4], [3, 4, 3.5]])
    m = iterations_to_match(cold, warm)
    assert m["per_image"][0] == 1 and m["per_image"][1] == 3 and math.isnan(m["per_image"][2])
    assert m["iterations_to_match"] == 3  # mean curve: 8, 5.33, 4, 3.5 vs reference 11/3 -> first at k = 3
    assert m["iterations_to_match_median"] == 3 and m["matched_frac"] == pytest.approx(2 / 3)
    assert m["speedup"] == 1.0


def _curves(energy: list[list[float]]) -> Any:
    """Curves with the given energy trace (rows: iterations 0..T, columns: images), other metrics 0."""
    from warplca.evaluation.curves import Curves

    e = torch.tensor(energy, dtype=torch.float64)
    z = torch.zeros_like(e)
    q = torch.zeros(2, e.shape[1])
    return Curves("x", [0, e.shape[0] - 1], e, z, z, q, q, 1, 1)


def test_equal_energy_speedup_rules() -> None:
    from warplca.evaluation.convergence import speedup_display
    from warplca.evaluation.curves import equal_energy_speedup, iterations_to_match

    # T = 4, three images; image 2's cold run never gets below 10
    cold = _curves([[10, 10, 10], [10, 9, 10], [6, 8, 10], [4, 7, 10], [3.5, 6, 10]])
    warm = _curves([[7, 8, 10], [5, 7, 9], [4, 6, 9], [3, 5, 9], [2, 4, 9]])
    rows = equal_energy_speedup(cold, warm, ks=[0, 1, 4])
    by = {(r["budget"], r["k"]): r for r in rows}
    assert [(r["budget"], r["k"]) for r in rows] == [
        ("warm", 0), ("warm", 1), ("warm", 4), ("cold", 1), ("cold", 4)
    ]
    # warm budget k = 1: mean warm energy 7 -> mean cold (10, 9.67, 8, 7, 6.5) reaches it after 3
    r = by[("warm", 1)]
    assert r["energy"] == pytest.approx(7.0) and r["warm_iterations"] == 1 and r["cold_iterations"] == 3
    assert r["speedup"] == 3.0 and r["never_frac"] == pytest.approx(1 / 3)
    # per image: cold needs 3, 3 and never (> T): nearest-rank quartiles 3, 3, inf
    assert (r["q25_iterations"], r["q50_iterations"], r["q75_iterations"]) == (3, 3, math.inf)
    assert (r["q25_speedup"], r["q50_speedup"], r["q75_speedup"]) == (3, 3, math.inf)
    # k = 0: what the predicted start alone is worth in cold iterations; no ratio
    assert by[("warm", 0)]["cold_iterations"] == 2 and math.isnan(by[("warm", 0)]["speedup"])
    # k = T: mean warm energy 5 is never reached by cold within T
    assert by[("warm", 4)]["cold_iterations"] == math.inf and by[("warm", 4)]["speedup"] == math.inf
    # cold budget k = T is iterations-to-match: warm reaches 6.5 after 2 -> speed-up 2
    r = by[("cold", 4)]
    assert r["warm_iterations"] == 2 == iterations_to_match(cold, warm)["iterations_to_match"]
    assert r["cold_iterations"] == 4 and r["speedup"] == 2.0 and r["never_frac"] == 0.0
    # per image warm iterations 3, 2, 0 -> speed-ups 4/3, 2, 4 (a 0-iteration start counts as 1)
    assert (r["q25_iterations"], r["q50_iterations"], r["q75_iterations"]) == (0, 2, 3)
    assert r["q25_speedup"] == pytest.approx(4 / 3) and r["q50_speedup"] == 2 and r["q75_speedup"] == 4
    # never within T is shown as a bound, not as a number
    shown = {(r["budget"], r["k"]): r for r in speedup_display(rows)}
    assert shown[("warm", 4)]["cold_iterations"] == "> 4" and shown[("warm", 4)]["speedup"] == "> 1"
    assert shown[("warm", 1)]["q75_iterations"] == "> 4" and shown[("warm", 1)]["q75_speedup"] == "> 4"
    assert shown[("warm", 1)]["speedup"] == 3.0
    # a warm run that never reaches the cold energy: the speed-up is bounded above by k / T
    cold2, warm2 = _curves([[10], [1], [1]]), _curves([[5], [4], [3]])
    r2 = {(r["budget"], r["k"]): r for r in speedup_display(equal_energy_speedup(cold2, warm2, ks=[0, 1, 2]))}
    assert r2[("cold", 1)]["warm_iterations"] == "> 2" and r2[("cold", 1)]["speedup"] == "< 0.5"
    assert r2[("warm", 1)]["cold_iterations"] == 1 and r2[("warm", 2)]["speedup"] == 0.5


def test_merge_metrics_and_report_sections(tmp_path: Path) -> None:
    from warplca.evaluation.report import markdown_table, merge_metrics, read_metrics, write_report_section

    (tmp_path / "metrics.json").write_text(json.dumps({"warp": {"val/loss": 1.0}, "eval": {"old": 1}}))
    merge_metrics(tmp_path, {"a/b": 2.0, "nan": math.nan}, section="eval")
    data = read_metrics(tmp_path)
    assert data["warp"] == {"val/loss": 1.0} and data["eval"] == {"old": 1, "a/b": 2.0, "nan": None}
    write_report_section(tmp_path, "one", "## One\nfirst")
    write_report_section(tmp_path, "two", "## Two")
    write_report_section(tmp_path, "one", "## One\nsecond")
    text = (tmp_path / "report.md").read_text()
    assert "second" in text and "first" not in text and text.index("## One") < text.index("## Two")
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": math.nan}], ["a", "b"])
    assert table.splitlines()[0] == "| a | b      |" and "0.1235" in table and "–" in table


def test_log_to_loggers_sends_scalars_images_tables(tmp_path: Path) -> None:
    import numpy as np
    from pytorch_lightning.loggers import CSVLogger

    from warplca.evaluation.report import log_to_loggers

    class WandbLogger:  # records what a real WandbLogger would receive
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []

        def log_metrics(self, metrics: dict[str, float]) -> None:
            self.calls.append(("metrics", metrics))

        def log_image(self, key: str, images: list[Any]) -> None:
            self.calls.append(("image", (key, images[0].shape)))

        def log_table(self, key: str, columns: list[str], data: list[list[Any]]) -> None:
            self.calls.append(("table", (key, columns, data)))

        def log_text(self, key: str, columns: list[str], data: list[list[Any]]) -> None:
            self.calls.append(("text", key))

    wb = WandbLogger()
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="eval")
    log_to_loggers(
        [wb, csv_logger, None],
        {"x": 1.0, "bad": math.nan, "s": "text"},
        images={"img": np.random.rand(8, 9, 3)},
        tables={"t": (["k", "v"], [{"k": 1, "v": 2.5}])},
        text={"md": "# hi"},
    )
    kinds = {c[0]: c[1] for c in wb.calls}
    assert kinds["metrics"] == {"x": 1.0}
    assert kinds["image"] == ("img", (8, 9, 3))
    assert kinds["table"] == ("t", ["k", "v"], [[1, 2.5]])
    assert "x" in (tmp_path / "csv" / "eval" / "metrics.csv").read_text().splitlines()[0].split(",")


def test_measuring_writes_nothing_and_the_writer_writes_everything(model: Any, tmp_path: Path) -> None:
    """An experiment measures into a result; :func:`write_result` alone turns it into files."""
    from warplca.evaluation.convergence import TimingSettings, measure_convergence
    from warplca.evaluation.report import write_result

    before = set(Path.cwd().iterdir())
    result = measure_convergence(model, test_images()[:4], iters=5, budgets=[1, 5], batch_size=4, examples=2,
                                 examples_iters=1, timing=TimingSettings(enabled=False), show_progress=False)
    assert set(Path.cwd().iterdir()) == before and result.files == {}
    assert {"convergence.csv", "speedup.csv"} <= set(result.csv)
    assert result.metrics["convergence/T"] == 5 and "convergence/iterations_to_match" in result.metrics
    files = write_result(result, tmp_path, metrics_section="eval")
    for name in (*result.csv, *(f.filename for f in result.figures.values())):
        assert (tmp_path / name).is_file(), name
    assert files["plot"] == tmp_path / "convergence.png"
    assert "<!-- warplca:convergence -->" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert saved["convergence/T"] == 5


# -- convergence -----------------------------------------------------------------------------------
def test_convergence_files(conv_out: tuple[Path, dict[str, float]]) -> None:
    from warplca.evaluation.common import log_spaced_ks

    run, metrics = conv_out
    data = json.loads((run / "metrics.json").read_text())
    assert data["dictionary"] == {"test/psnr": 20.0}, "other stages' metrics must survive"
    assert data["eval"]["convergence/T"] == T and metrics["eval/convergence/T"] == T
    rows = rows_of(run / "convergence.csv")
    assert list(rows[0]) == ["method", "k", "energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac", "mse"]
    ks = log_spaced_ks(T)
    assert [(r["method"], int(r["k"])) for r in rows] == [(m, k) for m in ("cold", "warm") for k in ks]
    table = rows_of(run / "convergence_table.csv")
    assert [(int(r["iters"]), r["key"]) for r in table] == [
        (k, m) for k in (1, 10, T) for m in ("cold", "warm")
    ]
    assert all(float(r["ms_per_image"]) > 0 for r in table), "timing was enabled"
    assert len(rows_of(run / "convergence_iterations_to_match.csv")) == 8
    assert not (run / "convergence_iters_to_match.csv").exists()
    speed = rows_of(run / "speedup.csv")
    assert list(speed[0])[:5] == ["budget", "k", "energy", "warm_iterations", "cold_iterations"]
    assert [(r["budget"], int(r["k"])) for r in speed] == [("warm", k) for k in ks] + [
        ("cold", k) for k in ks if k >= 1
    ]
    check_png(run / "speedup.png")
    check_png(run / "convergence.png", (10, 7.5))
    check_png(run / "convergence_examples.png")
    check_png(run / "atoms.png")
    report = (run / "report.md").read_text()
    assert "<!-- warplca:convergence -->" in report and "| iterations |" in report
    assert "![convergence curves](convergence.png)" in report and "Iterations-to-match" in report
    assert "### Equal-energy speed-up" in report and "![equal-energy speed-up](speedup.png)" in report
    assert "Start guard" in report
    for key in ("iterations_to_match", "iterations_to_match_median", "start_guard_frac",
                "start_guard_ms_per_image", "predictor_ms_per_image"):
        assert f"convergence/{key}" in data["eval"], key
    assert not any("iters_to_match" in key for key in data["eval"])
    assert 0.0 <= data["eval"]["convergence/start_guard_frac"] <= 1.0
    assert data["eval"]["convergence/start_guard_ms_per_image"] > 0
    equal = {k: v for k, v in data["eval"].items() if k.startswith("convergence/equal_energy/")}
    assert {"cold_iterations@warm10", "speedup@cold20"} <= {k.split("/")[-1] for k in equal}
    assert all(v is None or math.isfinite(v) for v in equal.values())  # never within T: null, not Infinity


def test_convergence_numbers_match_the_api(conv_out: tuple[Path, dict[str, float]], model: Any) -> None:
    from warplca.metrics import reconstruction_metrics

    run, _ = conv_out
    rows = {
        (r["method"], int(r["k"])): {k: float(v) for k, v in r.items() if k not in ("method",)}
        for r in rows_of(run / "convergence.csv")
    }
    images = test_images()
    x = model.preprocess(images)
    for method, warm in (("cold", False), ("warm", True)):
        for k in (1, 10, T):
            res = model(x, iters=k, warm=warm)
            row = rows[(method, k)]
            assert row["energy"] == pytest.approx(float(res.energy.mean()), rel=1e-5)
            assert row["l0"] == pytest.approx(float(torch.count_nonzero(res.a)) / images.shape[0])
            quality = reconstruction_metrics()
            quality.update(model.postprocess(res.recon).clamp(0, 1), images)
            q = quality.compute()
            assert row["psnr"] == pytest.approx(float(q["psnr"]), rel=1e-4)
            assert row["ssim"] == pytest.approx(float(q["ssim"]), rel=1e-4, abs=1e-5)
    # cold LCA through the plain solver with the bundle's settings gives the same energies
    from warplca.lca import LCA

    plain = LCA(model.dictionary, **model.lca.settings())
    assert rows[("cold", 10)]["energy"] == pytest.approx(float(plain(x, iters=10).energy.mean()), rel=1e-5)
    # iterations-to-match per image, from a direct traced warm run and the cold energy at T
    cold_t = model(x, iters=T, warm=False).energy
    warm_trace = model(x, iters=T, warm=True, trace=True).trace["energy"]
    per_image = rows_of(run / "convergence_iterations_to_match.csv")
    for i, r in enumerate(per_image):
        hits = torch.nonzero(warm_trace[:, i] <= cold_t[i]).flatten()
        expected = float(hits[0]) if len(hits) else math.nan
        got = float(r["k"]) if r["k"] not in ("", "nan") else math.nan
        assert (math.isnan(expected) and math.isnan(got)) or got == expected
    # equal-energy speed-up at warm budget 10: the first cold iteration with mean energy <= warm's at 10
    cold_mean = model(x, iters=T, warm=False, trace=True).trace["energy"].double().mean(1)
    target = float(warm_trace[10].double().mean())
    hits = torch.nonzero(cold_mean <= target).flatten()
    speed = {(r["budget"], int(r["k"])): r for r in rows_of(run / "speedup.csv")}
    assert speed[("warm", 10)]["cold_iterations"] == (str(int(hits[0])) if len(hits) else f"> {T}")
    # the start guard's fraction is what the bundle reports for these images
    guarded = model.warm_start(x).guarded
    data = json.loads((run / "metrics.json").read_text())["eval"]
    assert data["convergence/start_guard_frac"] == pytest.approx(float(guarded.double().mean()))


# -- the other experiments -------------------------------------------------------------------------
def test_denoise(tiny_run: Path, tmp_path: Path, model: Any) -> None:
    from warplca.data import corrupt
    from warplca.evaluation.common import pixel_quality

    run_eval(
        f"run_dir={tiny_run}",
        f"out_dir={tmp_path}",
        "eval=denoise",
        *FAST,
        "eval.denoise.sigmas=[0.1,0.2]",
        "eval.denoise.budgets=[5,20]",
        "eval.denoise.examples=2",
        "eval.denoise.lam_factors=[1,3]",
        "eval.denoise.select_images=4",
    )
    rows = rows_of(tmp_path / "denoise_table.csv")
    assert list(rows[0]) == ["sigma", "method", "k", "psnr", "ssim", "energy", "l0"]
    assert [(float(r["sigma"]), r["method"], r["k"]) for r in rows] == [
        (s, m, k)
        for s in (0.1, 0.2)
        for m, k in (("noisy", ""), ("cold", "5"), ("cold", "20"), ("warm", "5"), ("warm", "20"))
    ]
    images = test_images()
    noisy = corrupt(images, "gaussian_noise", 0.1, seed=0)
    p, s = pixel_quality(noisy, images)
    assert float(rows[0]["psnr"]) == pytest.approx(float(p.mean()), rel=1e-5)
    res = model(model.preprocess(noisy), iters=20, warm=False)
    p, _ = pixel_quality(model.postprocess(res.recon), images)
    assert float(rows[2]["psnr"]) == pytest.approx(float(p.mean()), rel=1e-5)
    check_png(tmp_path / "denoise.png", (8.4, 7))
    check_png(tmp_path / "denoise_examples.png")
    data = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert data["denoise/sigma0.1/cold/psnr@20"] == pytest.approx(float(rows[2]["psnr"]))
    assert "## Denoising" in (tmp_path / "report.md").read_text()
    # λ and k chosen on val per σ and method, then measured on test at that (λ, k)
    from warplca.data import NaturalDataModule
    from warplca.evaluation.denoise import at_lambda, select_lambda

    tuned = {(float(r["sigma"]), r["key"]): r for r in rows_of(tmp_path / "denoise_tuned.csv")}
    assert sorted(tuned) == [(s, k) for s in (0.1, 0.2) for k in ("cold", "early_stopped_cold", "warm")]
    lam0 = float(model.lca.lam)
    kw = {k: v for k, v in DATA.items() if k != "_target_"} | {"seed": 0}
    val = NaturalDataModule(**kw).tensor("val")[0][:4]
    for (sigma, key), r in tuned.items():
        lams = [lam0] if key == "early_stopped_cold" else [lam0, 3 * lam0]
        grid = [0, 1, 2, 3, 5, 10, 20]
        lam, k, _ = select_lambda(model, val, sigma, lams, key == "warm", grid, seed=0)
        assert float(r["lam"]) == pytest.approx(lam) and int(r["k"]) == k
        noisy = corrupt(images, "gaussian_noise", sigma, seed=0)
        res = at_lambda(model, lam)(model.preprocess(noisy), iters=k, warm=key == "warm")
        p, _ = pixel_quality(model.postprocess(res.recon).clamp(0, 1), images)
        assert float(r["psnr"]) == pytest.approx(float(p.mean()), rel=1e-5)
    assert "### Denoising as a user would run it" in (tmp_path / "report.md").read_text()
    assert data["denoise/sigma0.2/tuned/warm/lam"] in (lam0, 3 * lam0)


def test_ood_skips_missing_datasets(tiny_run: Path, tmp_path: Path) -> None:
    natural = "{_target_:warplca.data.NaturalDataModule,crop_size:32,n_train:4,n_val:4,n_test:4}"
    sources = (
        f"eval.ood.sources=[{{name:natural_32,data:{natural}}},"
        "{name:digits_rgb,data:{_target_:warplca.data.DigitsDataModule,rgb:true}},"
        "{name:photos_24,photos:{names:[camera,coins,moon],crop_size:24}},"
        f"{{name:stl10,data:{{_target_:warplca.data.STL10DataModule,data_dir:'{tmp_path / 'none'}'}}}}]"
    )
    metrics = run_eval(
        f"run_dir={tiny_run}", f"out_dir={tmp_path}", "eval=ood", *FAST, "eval.ood.n_images=2", sources
    )
    rows = rows_of(tmp_path / "ood_table.csv")
    assert list(rows[0]) == [
        "dataset",
        "size",
        "method",
        "k",
        "energy",
        "energy_norm",
        "psnr",
        "ssim",
        "l0",
        "l0_frac",
    ]
    sizes = {r["dataset"]: r["size"] for r in rows}
    assert sizes == {
        "natural/test (in distribution)": "16×16",
        "natural_32": "32×32",
        "digits_rgb": "32×32",
        "photos_24": "24×24",
    }
    assert len(rows) == 4 * 2 * 3  # datasets × methods × budgets (1, 10, T)
    report = (tmp_path / "report.md").read_text()
    assert "`stl10`: skipped" in report and "stl10_binary" in report
    assert metrics["eval/ood/natural_32/n_images"] == 2
    check_png(tmp_path / "ood.png", (12, 4.8))
    # cold vs warm at k = 0, 1, 10 and the other budgets, on every image set
    compare = rows_of(tmp_path / "ood_cold_vs_warm.csv")
    assert list(compare[0])[:4] == ["dataset", "size", "n_images", "k"]
    assert [(r["dataset"], int(r["k"])) for r in compare] == [(d, k) for d in sizes for k in (0, 1, 10, T)]
    for r in compare:
        assert r["warm_le_cold"] == str(float(r["warm_energy"]) <= float(r["cold_energy"]))
        if r["k"] == "0":  # the start guard: WARP-LCA never starts above cold LCA
            assert r["warm_le_cold"] == "True" and float(r["warm_le_cold_frac"]) == 1.0
            assert float(r["cold_l0"]) == 0.0
    by = {(r["dataset"], int(r["k"])): r for r in compare}
    table = {(r["dataset"], r["method"], int(r["k"])): r for r in rows}
    for d in sizes:
        for m in ("cold", "warm"):
            assert float(by[(d, 10)][f"{m}_energy"]) == pytest.approx(float(table[(d, m, 10)]["energy"]))
            assert float(by[(d, 10)][f"{m}_l0"]) == pytest.approx(float(table[(d, m, 10)]["l0"]))
    warm0 = float(by[("photos_24", 0)]["warm_energy"])
    assert metrics["eval/ood/photos_24/warm/energy@0"] == pytest.approx(warm0)
    assert 0.0 <= metrics["eval/ood/photos_24/start_guard_frac"] <= 1.0
    assert "| dataset" in report and "warm ≤ cold" in report


def test_photo_crops_are_deterministic_grey_and_cover_every_photo() -> None:
    from warplca.evaluation.ood import photo_crops

    names = ["camera", "brick", "coins"]
    a = photo_crops(names, crop_size=24, n=7, seed=3)
    assert a.shape == (7, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, photo_crops(names, crop_size=24, n=7, seed=3))
    assert not torch.equal(a, photo_crops(names, crop_size=24, n=7, seed=4))
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])  # grey photos: 3 equal channels
    assert bool((a.flatten(1).std(1) >= 0.02).all()) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # round robin: image i comes from photo i % 3; a photo's crops do not depend on the others
    assert torch.equal(photo_crops(["coins"], crop_size=24, n=2, seed=3), a[[2, 5]])
    with pytest.raises(ValueError, match="crop_size"):
        photo_crops(["coins"], crop_size=400, n=1)


def test_default_ood_sources_are_valid() -> None:
    from warplca.config import compose_config
    from warplca.evaluation.ood import OODSource

    cfg = compose_config(["eval=all"], config_name="eval")
    assert list(cfg.eval.modes) == ["convergence", "thresholds", "denoise", "ood", "robustness"]
    sources = [OODSource.from_config(s) for s in cfg.eval.ood.sources]
    assert [s.name for s in sources] == [
        "natural_64", "natural_96", "photos_32", "photos_64", "photos_96", "digits_rgb", "stl10", "pets"
    ]
    assert all(("_target_" in s.data) != bool(s.photos) for s in sources)
    assert [s.photos["crop_size"] for s in sources if s.photos] == [32, 64, 96]
    with pytest.raises(ValueError, match="either"):
        OODSource.from_config({"name": "x", "photos": {"crop_size": 8}, "data": {"name": "natural"}})


def test_match_channels() -> None:
    from warplca.evaluation.ood import match_channels

    grey = torch.rand(2, 1, 8, 8)
    rgb, note = match_channels(grey, 3)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 2], grey[:, 0]) and "replicated" in note
    assert match_channels(rgb, 3) == (rgb, None)
    assert match_channels(rgb, 1)[0].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="4-channel"):
        match_channels(torch.rand(1, 4, 8, 8), 3)


def test_thresholds_with_own_bundles(tiny_run: Path, tmp_path: Path) -> None:
    soft = make_bundle(tmp_path / "soft" / "warp_lca.pt", threshold="soft", lam=0.05, seed=1).parent
    cel0 = make_bundle(tmp_path / "cel0.pt", threshold="cel0", lam=0.1, seed=2)
    out = tmp_path / "out"
    run_eval(
        f"run_dir={tiny_run}",
        f"out_dir={out}",
        "eval=thresholds",
        *FAST,
        "eval.thresholds.include_main=false",
        f"eval.thresholds.runs={{soft:'{soft}',cel0:'{cel0}',half:'{tmp_path / 'missing'}'}}",
    )
    summary = rows_of(out / "thresholds_summary.csv")
    assert [r["threshold"] for r in summary] == ["soft", "cel0"]
    assert float(summary[0]["lam"]) == pytest.approx(0.05)
    table = rows_of(out / "thresholds_table.csv")
    cold_t = [r for r in table if r["threshold"] == "soft" and r["method"] == "cold" and r["k"] == str(T)]
    assert float(cold_t[0]["rel_energy"]) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "## Thresholds" in report and "`half`: skipped" in report
    check_png(out / "thresholds.png", (15, 4.6))


def test_thresholds_without_any_bundle_fails_clearly(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no bundle found"):
        run_eval(
            f"run_dir={run}",
            "eval=thresholds",
            *FAST,
            "eval.thresholds.include_main=false",
            f"eval.thresholds.runs={{soft:'{tmp_path / 'nope'}'}}",
        )


def test_robustness_section_from_the_classify_csv(tmp_path: Path) -> None:
    from warplca.evaluation.robustness import write_robustness_csv

    run = make_run(tmp_path / "run")
    none = run_eval(f"run_dir={run}", "eval=robustness", "progress=false")
    assert none == {} and "run the classify stage first" in (run / "report.md").read_text()
    rows = [
        {"frontend": fe, "corruption": c, "level": lv, "accuracy": acc, "ms_per_image": 1.0}
        for fe, base in (("pixels", 0.9), ("warp_lca", 0.85))
        for c, lv, acc in (
            ("clean", 0.0, base),
            ("gaussian_noise", 0.1, base - 0.2),
            ("gaussian_noise", 0.2, base - 0.3),
        )
    ]
    write_robustness_csv(rows, run / "robustness.csv")
    metrics = run_eval(f"run_dir={run}", "eval=robustness", "progress=false")
    assert metrics["eval/robustness/pixels/mca"] == pytest.approx(0.65)
    check_png(run / "robustness.png")
    assert "mCA" in (run / "report.md").read_text()


def test_sweep_summary_marks_failed_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for num, lam, metrics in (
        (0, 0.25, {"report": {"convergence/iterations_to_match": 12.0, "convergence/warm/psnr@10": 20.0}}),
        (1, 0.5, {"report": {"convergence/iterations_to_match": 7.0, "convergence/warm/psnr@10": 22.0}}),
        (2, 1.0, None),
    ):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lca.lam={lam}", "seed=0"]))
        if metrics is not None:
            (job / "metrics.json").write_text(json.dumps(metrics))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    out = run_eval(f"sweep_dir={sweep}")
    assert out == {"sweep/jobs": 3.0, "sweep/failed": 1.0}
    rows = rows_of(sweep / "sweep_summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert [float(r["lca.lam"]) for r in rows] == [0.25, 0.5, 1.0]
    assert float(rows[1]["report/convergence/iterations_to_match"]) == 7.0
    assert rows[2]["report/convergence/iterations_to_match"] == "" and "no metrics.json" in rows[2]["error"]
    check_png(sweep / "sweep_lca.lam.png")
    text = (sweep / "sweep_summary.md").read_text()
    assert "1 failed" in text and f"python evaluate.py sweep_dir={sweep}" in text


# -- README results page, report stage, CLI --------------------------------------------------------
def test_results_page(conv_out: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    run, _ = conv_out
    page = tmp_path / "docs" / "results.md"
    run_eval(f"run_dir={run}", "eval=common", f"results_md={page}")
    text = page.read_text()
    assert text.startswith("# Results") and "python evaluate.py" in text
    assert "![convergence curves](figures/convergence.png)" in text and "| iterations |" in text
    assert (tmp_path / "docs" / "figures" / "convergence.png").is_file()
    assert "warplca:" not in text


def test_report_stage_prints_the_table(
    make_cfg: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from warplca.tasks.train import train

    run = tmp_path / "run"
    run.mkdir()
    make_bundle(run / "warp_lca.pt")
    from warplca.evaluation.robustness import write_robustness_csv

    (run / "metrics.json").write_text(json.dumps({"dictionary": {"test/psnr": 20.0}}))

    write_robustness_csv(
        [
            {"frontend": "pixels", "corruption": c, "level": lv, "accuracy": a, "ms_per_image": 1.0}
            for c, lv, a in (("clean", 0.0, 0.9), ("gaussian_noise", 0.1, 0.5))
        ],
        run / "robustness.csv",
    )
    cfg = make_cfg(
        "stages=[report]",
        "eval.n_images=4",
        "eval.convergence.timing.images=2",
        "eval.convergence.timing.repeats=1",
        "eval.convergence.timing.max_seconds=0.2",
        "eval.convergence.examples.images=2",
        "progress=false",
        "logger=csv",
        output_dir=run,
    )
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert "Cold LCA vs WARP-LCA" in out and "| iterations | method" in out
    assert "| 1          | LCA (cold)" in out and "WARP-LCA" in out and "Iterations-to-match" in out
    assert (run / "report.md").is_file() and (run / "convergence.png").is_file()
    report = (run / "report.md").read_text()
    assert (
        report.index("## Convergence") < report.index("## Noisy classification") < report.index("## Pipeline")
    )
    assert metrics["report/robustness/pixels/mca"] == pytest.approx(0.5)
    assert metrics["report/convergence/T"] == T
    data = json.loads((run / "metrics.json").read_text())
    assert data["report"]["convergence/n_images"] == 4
    assert (run / "csv" / "report" / "metrics.csv").is_file()


def test_cli_evaluate_leaves_the_run_config_alone(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / ".hydra" / "config.yaml").read_text()
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"run_dir={run}", *FAST, f"hydra.run.dir={tmp_path / 'hy'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| iterations | method" in proc.stdout
    assert (run / ".hydra" / "config.yaml").read_text() == before
    assert (tmp_path / "hy" / "evaluate.log").is_file()
    assert json.loads((run / "metrics.json").read_text())["eval"]["convergence/T"] == T


def test_missing_run_dir_is_explained() -> None:
    with pytest.raises(ValueError, match="run_dir="):
        run_eval("progress=false")
