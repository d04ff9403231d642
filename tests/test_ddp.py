"""Scale-out: DDP on 2 CPU processes gives the 1-process metrics, writes side effects once, shards the
target cache; the GPU path (bf16-mixed networks, fp32 LCA, channels_last, torch.compile) works on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from warplca import LCA, ConvDictionary
from warplca.data import NaturalDataModule, Normalization
from warplca.data.resumable import EpochSampler, ResumableDataLoader
from warplca.modules.dictionary_learning import DictionaryLearning

REPO = Path(__file__).resolve().parents[1]
LCA_SETTINGS = {"threshold": "hard", "lam": 0.3, "tau": "auto"}


def _dictionary_run(devices: int, batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Two epochs of dictionary learning on 32 natural crops: 1 process × batch 2B or 2 × batch B."""
    # no random flips/rotations: they draw from each process's own RNG, so the ranks' augmentations differ
    dm = NaturalDataModule(batch_size=batch_size, n_train=32, n_val=16, n_test=16, seed=0, flip=False,
                           rot90=False)
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=0)
    module = DictionaryLearning(d, LCA_SETTINGS, dm.normalization, lr=0.02, iters=15,
                                log_images_every_n_epochs=0)
    kw: dict[str, Any] = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, module.dictionary.weight.detach().clone()


def test_ddp_spawn_two_processes_match_one_process() -> None:
    """Global batch semantics: 2 processes × batch 8 train on exactly the items of 1 process × batch 16
    at every step (the epoch permutation is split r, r+2, …), gradients are averaged, metrics synced."""
    one, w_one = _dictionary_run(devices=1, batch_size=16)
    two, w_two = _dictionary_run(devices=2, batch_size=8)
    assert torch.allclose(w_one, w_two, atol=2e-5), (w_one - w_two).abs().max()
    for key in ("val/psnr", "val/ssim", "val/energy", "val/l0_per_image", "train/energy", "train/psnr"):
        assert key in one and key in two, key
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


def test_epoch_order_is_split_across_ranks_like_one_big_batch() -> None:
    """What makes the test above exact: rank r of W takes items r, r+W, … of the same permutation."""
    order_sampler = EpochSampler(24, seed=5)
    order_sampler.set_epoch(3)
    order = order_sampler.order()
    per_rank = []
    for r in (0, 1):
        s = EpochSampler(24, seed=5, num_replicas=2, rank=r)
        s.set_epoch(3)
        assert len(s) == 12
        per_rank.append(list(s))
    for step in range(3):  # batch 4 per rank == batch 8 in one process
        both = per_rank[0][4 * step: 4 * step + 4] + per_rank[1][4 * step: 4 * step + 4]
        assert sorted(both) == sorted(order[8 * step: 8 * step + 8])
    assert EpochSampler(24, seed=5).order() != order  # another epoch, another permutation
    odd = [list(EpochSampler(5, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 3 and set(odd[0] + odd[1]) == set(range(5))  # padded


def test_lightning_keeps_the_epoch_sampler_under_ddp() -> None:
    from torch.utils.data import DistributedSampler

    loader = ResumableDataLoader(list(range(10)), batch_size=2, seed=0)
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning injects no sampler of its own
    with pytest.raises(ValueError, match="empty"):
        ResumableDataLoader([], batch_size=2)


def _cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_strategy_ddp_two_processes_write_once(tmp_path: Path) -> None:
    """``strategy=ddp`` re-launches train.py for rank 1: it reuses rank 0's run directory, and the
    artifacts, metrics.json, CSV log and console table are produced once; nothing lands in the cwd."""
    from conftest import TINY_OVERRIDES

    run = tmp_path / "run"
    res = _cli(*TINY_OVERRIDES, "trainer=ddp_cpu_script", "data.n_train=64", "data.batch_size=16",
               f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "files written outside the run directory"
    assert (run / "dictionary.pt").is_file() and (run / "checkpoints" / "dictionary" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())["dictionary"]
    assert metrics["test/psnr"] > 0
    assert res.stdout.count(" time_s ") == 1, "the closing table was printed by more than one rank"
    assert [p.name for p in (run / "csv").iterdir()] == ["dictionary"]
    log_text = (run / "train.log").read_text()
    assert log_text.count("saved ") == 1 and "dictionary.pt" in log_text
    assert log_text.count("run directory:") == 1, "another rank wrote into rank 0's log"
    assert (run / "train.rank1.log").is_file()  # rank 1 logs to its own file
    # rank 1 ran in the same directory (Lightning passed hydra.run.dir) and wrote no Hydra config of its own
    assert not list(run.glob(".pl_hydra*")) and (run / ".hydra" / "config.yaml").is_file()
    assert "train_ddp_process_1" not in " ".join(p.name for p in run.iterdir())


# -------------------------------------------------------------------------------------------------
# the state-target cache shards across ranks
# -------------------------------------------------------------------------------------------------

from warplca.modules.target_builder import TargetBuilder  # noqa: E402


class RankRecordingBuilder(TargetBuilder):
    """Writes ``chunks/<i>.rank`` with the global rank that computed chunk i."""

    def predict_step(self, batch: Any, batch_idx: int) -> int:
        chunk = super().predict_step(batch, batch_idx)
        (self.directory / "chunks" / f"{chunk}.rank").write_text(str(self.trainer.global_rank))
        return chunk


@pytest.mark.slow
def test_target_cache_build_shards_chunks_across_two_processes(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    from warplca.data.target_cache import TargetCache, expected_manifest
    from warplca.modules.target_builder import build_target_cache

    images = torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(images, torch.arange(40))
    d = ConvDictionary(n_atoms=4, in_channels=3, kernel_size=5, stride=2, seed=1)
    lca = LCA(d, threshold="hard", lam=0.2, tau="auto")
    norm = Normalization(mean=(0.5, 0.5, 0.5), scale=1.0)
    manifest = expected_manifest(ds, d, lca.settings(), 8, norm, dataset_name="toy", split="train",
                                 chunk_size=5)
    builder = RankRecordingBuilder(tmp_path / "ddp", ds, d, lca.settings(), manifest, norm, batch_size=5)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(builder, return_predictions=False)
    ranks = {int(p.stem): int(p.read_text()) for p in (tmp_path / "ddp" / "chunks").glob("*.rank")}
    assert sorted(ranks) == list(range(8)), "every chunk computed exactly once"
    assert set(ranks.values()) == {0, 1}, "both ranks computed chunks"
    single = build_target_cache(tmp_path / "one", ds, d, lca, 8, norm, dataset_name="toy", split="train",
                                chunk_size=5, batch_size=5)
    ddp = TargetCache.open(tmp_path / "ddp", manifest)
    assert (tmp_path / "ddp" / "states.npy").read_bytes() == single.states_path.read_bytes()
    assert ddp.is_complete


# -------------------------------------------------------------------------------------------------
# the GPU path, exercised on CPU
# -------------------------------------------------------------------------------------------------


def test_lca_stays_float32_under_bf16_autocast() -> None:
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    lca = LCA(d, lam=0.3, tau="auto")
    x = torch.rand(4, 3, 16, 16) - 0.5
    ref = lca(x, iters=20, trace=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lca(x, iters=20, trace=True)
    assert got.u.dtype == torch.float32 and got.recon.dtype == torch.float32
    assert torch.equal(got.u, ref.u) and torch.equal(got.trace["energy"], ref.trace["energy"])


def test_warp_regression_trains_in_bf16_mixed_with_fp32_targets(tmp_path: Path) -> None:
    """trainer.precision=bf16-mixed: the WARP-CNN runs in bf16, the LCA validation stays fp32."""
    from torch.utils.data import DataLoader, TensorDataset

    from warplca.models import WarpCNN
    from warplca.modules.warp_regression import WarpRegression

    d = ConvDictionary(8, 3, 5, 2, seed=0).requires_grad_(False)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    states = LCA(d, lam=0.3, tau="auto")(images - 0.5, iters=10).u
    loader = DataLoader(TensorDataset(images, states), batch_size=4)
    module = WarpRegression(WarpCNN(3, 8, 2, width=8, depth=2), d, {"lam": 0.3, "tau": "auto"},
                            Normalization(mean=(0.5, 0.5, 0.5)), eval_iters=[0, 5])
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and torch.isfinite(m["val/warm_k5/energy"])
    assert m["val/cold_k5/energy"].dtype == torch.float32


def test_channels_last_callback() -> None:
    from warplca.callbacks import ChannelsLast
    from warplca.models import WarpCNN

    net = WarpCNN(3, 8, 2, width=8, depth=2)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

    module = Tiny()

    class FakeTrainer:
        class strategy:  # noqa: N801
            root_device = torch.device("cpu")

    ChannelsLast("auto").setup(FakeTrainer(), module, "fit")  # type: ignore[arg-type]
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # auto: CPU keeps NCHW
    ChannelsLast(True).setup(FakeTrainer(), module, "fit")  # type: ignore[arg-type]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = net(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 8, 8, 8)


def test_lca_compile_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from warplca.lca import solver

    def broken_compile(fn: Any, **kw: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no C++ compiler for inductor")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(solver, "_COMPILED", {})
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    x = torch.rand(2, 3, 16, 16) - 0.5
    eager = LCA(d, lam=0.3, tau="auto")(x, iters=15)
    lca = LCA(d, lam=0.3, tau="auto", compile=True)
    assert lca.settings()["compile"] is True
    with pytest.warns(RuntimeWarning, match="running the solver eagerly"):
        got = lca(x, iters=15)
    assert torch.allclose(got.u, eager.u, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls run eagerly in silence
        again = lca(x, iters=15)
    assert torch.allclose(again.u, eager.u, atol=1e-6)
    with pytest.raises(ValueError, match="compile"):
        LCA(d, compile="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_lca_compile_matches_eager() -> None:
    """The real torch.compile (inductor; needs a C++ compiler on CPU, ~1 min to compile here)."""
    from warplca.lca import solver

    solver._COMPILED.clear()
    d = ConvDictionary(8, 3, 5, 2, seed=0)
    x = torch.rand(3, 3, 16, 16) - 0.5
    eager = LCA(d, lam=0.3, tau="auto")(x, iters=25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = LCA(d, lam=0.3, tau="auto", compile=True)(x, iters=25)
    assert torch.allclose(got.u, eager.u, atol=1e-5)
    assert torch.allclose(got.energy, eager.energy, rtol=1e-5)


def test_cache_throughput_benchmark_runs(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cache_throughput
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    report = cache_throughput.main(["--n", "8", "--iters", "3", "--chunk-size", "4", "--batch-size", "4",
                                    "--atoms", "8", "--kernel", "5", "--device", "cpu",
                                    "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["n"] == 8 and saved["build_s"] > 0 and saved["extrapolation"]["n"] == 50_000
    assert report["extrapolation"]["seconds"] > 0
