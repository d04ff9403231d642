"""State-target cache: exact contents, crash + resume bit-identity, refusals, lazy reading, DDP."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from warplca import LCA, ConvDictionary
from warplca.data.normalization import Normalization
from warplca.data.target_cache import (
    TargetCache,
    TargetCacheIncompleteError,
    TargetCacheMismatchError,
    TargetDataset,
    data_fingerprint,
    expected_manifest,
)
from warplca.modules.target_builder import TargetBuilder, build_target_cache

N, CHUNK, BATCH, ITERS = 50, 8, 3, 12  # 7 chunks, the last one partial; 3 sub-batches per chunk
NORM = Normalization(mean=(0.5, 0.45, 0.4), scale=1.0)


def _setup(lam: float = 0.2) -> tuple[TensorDataset, ConvDictionary, LCA]:
    images = torch.rand(N, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(images, torch.arange(N))
    d = ConvDictionary(n_atoms=6, in_channels=3, kernel_size=5, stride=2, seed=3)
    return ds, d, LCA(d, threshold="hard", lam=lam, tau="auto")


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def _manifest(ds: TensorDataset, d: ConvDictionary, lca: LCA, iters: int = ITERS) -> dict[str, Any]:
    return expected_manifest(ds, d, lca.settings(), iters, NORM, dataset_name="toy", split="train",
                             dataset_config={"seed": 0, "batch_size": 7}, chunk_size=CHUNK)


def _build(directory: Path, **kw: Any) -> TargetCache:
    ds, d, lca = kw.pop("parts", None) or _setup()
    return build_target_cache(directory, ds, d, lca, kw.pop("iters", ITERS), NORM, dataset_name="toy",
                              split="train", dataset_config={"seed": 0, "batch_size": 7}, chunk_size=CHUNK,
                              batch_size=BATCH, trainer=kw.pop("trainer", None) or _trainer(), **kw)


class _Crash(TargetBuilder):
    """Raises inside predict_step once ``crash_after`` chunks are done (a crash mid-build)."""

    crash_after = 3

    def predict_step(self, batch: Any, batch_idx: int) -> int:
        if len(self.computed) == self.crash_after:
            raise RuntimeError("simulated crash")
        return super().predict_step(batch, batch_idx)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> TargetCache:
    """An uninterrupted build."""
    return _build(tmp_path_factory.mktemp("ref") / "targets")


def test_contents_are_the_cold_lca_states(reference: TargetCache) -> None:
    ds, d, lca = _setup()
    assert reference.shape == (N, 6, 6, 7) and reference.is_complete
    x = NORM.apply(ds.tensors[0])
    first = lca(x[:BATCH], iters=ITERS).u.contiguous()
    assert torch.equal(reference.read(0, BATCH), first)  # same sub-batch: bit-identical
    full = lca(x, iters=ITERS).u
    assert torch.allclose(reference.read(0, N), full, atol=1e-5)
    assert np.array_equal(np.asarray(reference.states()), reference.read(0, N).numpy())
    stats = reference.stats()
    assert stats["count"] == N and stats["energy"] > 0 and stats["l0_per_image"] > 0
    reference.verify()
    assert (reference.directory / "COMPLETE").is_file()


def test_crash_and_resume_is_bit_identical_without_recomputation(tmp_path: Path,
                                                                  reference: TargetCache) -> None:
    ds, d, lca = _setup()
    manifest = _manifest(ds, d, lca)
    directory = tmp_path / "targets"
    crashing = _Crash(directory, ds, d, lca.settings(), manifest, NORM, batch_size=BATCH)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer().predict(crashing, return_predictions=False)
    assert crashing.computed == [0, 1, 2]
    with pytest.raises(TargetCacheIncompleteError, match="3 of 7 chunks"):
        TargetCache.open(directory, manifest)
    assert not (directory / "COMPLETE").exists()

    resumed = TargetBuilder(directory, ds, d, lca.settings(), manifest, NORM, batch_size=BATCH)
    _trainer().predict(resumed, return_predictions=False)
    assert resumed.computed == [3, 4, 5, 6]  # finished chunks are not recomputed
    cache = TargetCache.open(directory, manifest)
    assert (directory / "states.npy").read_bytes() == reference.states_path.read_bytes()
    cache.verify()


def test_manifest_mismatch_is_refused_naming_the_keys(tmp_path: Path, reference: TargetCache) -> None:
    ds, d, lca = _setup(lam=0.3)
    wanted = _manifest(ds, d, lca, iters=ITERS + 1)
    with pytest.raises(TargetCacheMismatchError) as err:
        TargetCache.open(reference.directory, wanted)
    msg = str(err.value)
    assert "lam" in msg and "target_iters" in msg and "0.2" in msg and "0.3" in msg
    assert "dictionary" not in msg.split("differing keys")[1].split(")")[0]
    # building into a directory holding other settings refuses too, and overwrite rebuilds
    directory = tmp_path / "t"
    _build(directory)
    with pytest.raises(TargetCacheMismatchError, match="lam"):
        _build(directory, parts=(ds, d, lca))
    cache = _build(directory, parts=(ds, d, lca), overwrite=True)
    assert cache.manifest["lam"] == 0.3 and cache.is_complete
    # a volatile data key (batch_size) and the recorded dataset config do not matter
    ok = expected_manifest(ds, d, lca.settings(), ITERS, NORM, dataset_name="toy", split="train",
                           dataset_config={"seed": 1}, chunk_size=CHUNK)
    TargetCache.open(directory, ok)


def test_other_images_are_refused(reference: TargetCache) -> None:
    ds, d, lca = _setup()
    images = ds.tensors[0].clone()
    images[N - 1] = 0.0  # one changed image among the probed ones (first 16 + 16 evenly spaced)
    changed = TensorDataset(images, ds.tensors[1])
    assert data_fingerprint(changed) != data_fingerprint(ds)
    with pytest.raises(TargetCacheMismatchError, match="data_fingerprint"):
        TargetCache.open(reference.directory, _manifest(changed, d, lca))


def test_complete_cache_is_reused(reference: TargetCache) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (reference.directory / "chunks").iterdir()}

    class _NoTrainer:
        def predict(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("a complete cache must not be rebuilt")

    cache = _build(reference.directory, trainer=_NoTrainer())
    assert cache.is_complete
    after = {p.name: p.stat().st_mtime_ns for p in (reference.directory / "chunks").iterdir()}
    assert before == after


def test_limit_caches_a_prefix(tmp_path: Path, reference: TargetCache) -> None:
    cache = _build(tmp_path / "t", limit=10)
    assert cache.count == 10 and cache.n_chunks == 2
    assert torch.equal(cache.read(0, 10), reference.read(0, 10))


def test_dataset_reads_lazily_and_pickles(reference: TargetCache) -> None:
    ds, _, _ = _setup()
    td = TargetDataset(reference, ds)
    assert len(td) == N
    x, u = td[17]
    assert torch.equal(x, ds[17][0]) and torch.equal(u, reference.read(17))
    assert torch.equal(td[-1][1], reference.read(N - 1))
    clone = pickle.loads(pickle.dumps(td))  # DataLoader workers (spawn) pickle the dataset
    assert torch.equal(clone[5][1], reference.read(5))
    images, states = next(iter(DataLoader(td, batch_size=4, shuffle=False)))
    assert images.shape == (4, 3, 11, 13) and torch.equal(states, reference.read(0, 4))
    with pytest.raises(IndexError):
        td[N]
    with pytest.raises(ValueError, match="only"):
        TargetDataset(reference, TensorDataset(ds.tensors[0][:10], ds.tensors[1][:10]))


def test_damage_is_detected(tmp_path: Path) -> None:
    cache = _build(tmp_path / "t")
    with open(cache.states_path, "r+b") as fh:  # corrupt one value of chunk 2
        fh.seek(-4 * cache.shape[1] * cache.shape[2] * cache.shape[3] * (N - 2 * CHUNK), os.SEEK_END)
        fh.write(b"\xff\xff\xff\x7f")
    with pytest.raises(ValueError, match="chunk 2"):
        cache.verify()
    cache.states_path.unlink()
    with pytest.raises(ValueError, match="missing"):
        TargetCache.open(cache.directory)
    (cache.directory / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a warplca.target_cache"):
        TargetCache.open(cache.directory)
    with pytest.raises(FileNotFoundError, match="no state-target cache"):
        TargetCache.open(tmp_path / "nothing")


# -------------------------------------------------------------------------------------------------
# slow: a real kill, and DDP
# -------------------------------------------------------------------------------------------------

_KILLED_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_target_cache as t
    from warplca.modules.target_builder import TargetBuilder

    class Slow(TargetBuilder):
        def predict_step(self, batch, batch_idx):
            out = super().predict_step(batch, batch_idx)
            time.sleep(1.0)  # the parent kills us while we sleep after some chunks
            return out

    ds, d, lca = t._setup()
    b = Slow({directory!r}, ds, d, lca.settings(), t._manifest(ds, d, lca), t.NORM, batch_size=t.BATCH)
    t._trainer().predict(b, return_predictions=False)
""")


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path: Path, reference: TargetCache) -> None:
    directory = tmp_path / "targets"
    script = _KILLED_SCRIPT.format(tests=str(Path(__file__).parent), directory=str(directory))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (directory / "chunks" / "1.done").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ds, d, lca = _setup()
    manifest = _manifest(ds, d, lca)
    with pytest.raises(TargetCacheIncompleteError):
        TargetCache.open(directory, manifest)
    resumed = TargetBuilder(directory, ds, d, lca.settings(), manifest, NORM, batch_size=BATCH)
    _trainer().predict(resumed, return_predictions=False)
    assert 0 not in resumed.computed and 1 not in resumed.computed
    assert (directory / "states.npy").read_bytes() == reference.states_path.read_bytes()


@pytest.mark.slow
def test_ddp_build_shards_chunks_and_matches(tmp_path: Path, reference: TargetCache) -> None:
    directory = tmp_path / "targets"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    cache = _build(directory, trainer=trainer)
    assert cache.is_complete and (directory / "COMPLETE").is_file()
    assert (directory / "states.npy").read_bytes() == reference.states_path.read_bytes()
