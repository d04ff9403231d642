"""State-target cache: cold-LCA states u* of a dataset split, computed once, on disk, resumable.

WARP-CNN regresses the internal states of ordinary (cold-started) LCA runs after ``target_iters``
steps. Those targets are expensive (CIFAR-10: 50k images × 1000 steps), so they are computed once
into a directory::

    <dir>/manifest.json     what the targets are: dictionary fingerprint, λ, τ, target_iters, threshold,
                            nonneg, θ, normalisation, dataset + config, split, count, shape, dtype, chunk size
    <dir>/states.npy        float32 (N, K, H', W') in the .npy format (np.load(..., mmap_mode="r") reads it)
    <dir>/chunks/<i>.done   one marker per finished chunk (rows [i·c, (i+1)·c)): JSON with the rows'
                            SHA-256 and target statistics, written atomically *after* the rows are fsync'ed
    <dir>/COMPLETE          written by rank 0 once every chunk is done (summary statistics)

Guarantees:

- **never half-written**: a chunk counts only once its marker exists, and the marker is renamed into
  place after its rows are on disk; :meth:`TargetCache.open` refuses an incomplete cache.
- **resumable**: a crashed build is resumed by building again with the same manifest; finished
  chunks are not recomputed (every chunk is a fixed row range computed in fixed sub-batches, so a
  resumed cache is bit-identical to an uninterrupted one on the same device).
- **refused when stale**: a manifest that differs from the current config raises
  :class:`TargetCacheMismatchError` naming the differing keys.
- **DDP**: building runs through Lightning's predict loop; the dataloader yields whole chunks, the
  distributed sampler gives each rank its own chunks, every rank writes its own rows and markers,
  rank 0 writes the manifest (before, behind a broadcast) and ``COMPLETE`` (after, behind a barrier).
- **flat memory**: rows are written and read with positioned file I/O (``os.pwrite``/``os.pread``)
  rather than through a mapping, so the process never holds more than a chunk (building) or an item
  (reading) — mapped file pages would otherwise count in the resident set as the cache grows.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from warplca.data.normalization import Normalization
from warplca.lca.continuation import Continuation, solve_continuation
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA
from warplca.serialization import atomic_path, write_text_atomic

__all__ = [
    "FORMAT",
    "TargetBuilder",
    "TargetCache",
    "TargetCacheIncompleteError",
    "TargetCacheMismatchError",
    "TargetDataModule",
    "TargetDataset",
    "build_target_cache",
    "data_fingerprint",
    "expected_manifest",
    "manifest_diff",
    "target_manifest",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

FORMAT = "warplca.target_cache"
VERSION = 1
MANIFEST = "manifest.json"
STATES = "states.npy"
CHUNKS = "chunks"
COMPLETE = "COMPLETE"
DTYPE = np.float32

#: manifest keys that describe, not identify, a cache (never compared). The dataset config is recorded
#: but not compared (e.g. ``n_test`` does not change the train split); ``data_fingerprint`` and
#: ``count`` identify the images instead.
INFO_KEYS = frozenset({"created", "warplca_version", "tau_resolved", "dataset_config"})
#: datamodule config keys that do not change the images of a split (dropped from ``dataset_config``)
VOLATILE_DATA_KEYS = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers", "download",
                                "data_dir", "root"})


class TargetCacheMismatchError(ValueError):
    """The cache on disk was built with other settings than the ones asked for."""


class TargetCacheIncompleteError(RuntimeError):
    """The cache on disk is missing chunks (an interrupted build): build it again to resume."""


# -------------------------------------------------------------------------------------------------
# the manifest
# -------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """``obj`` after a JSON round trip (tuples → lists, keys → str): the form manifests are compared in."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def data_fingerprint(dataset: Dataset, count: int | None = None, probe: int = 16) -> str:
    """SHA-256 (16 hex) of the count and of ``probe`` first plus ``probe`` evenly spaced images among the
    first ``count``: identifies the images of a split whatever config produced them."""
    n = len(dataset) if count is None else count  # type: ignore[arg-type]
    h = hashlib.sha256(f"{n}|".encode())
    spaced = np.linspace(0, n - 1, num=min(n, probe)).round().astype(int).tolist()
    for i in sorted(set(range(min(n, probe))) | set(spaced)):
        x = _image(dataset[i])
        h.update(str(tuple(x.shape)).encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def target_manifest(dictionary: ConvDictionary, lca_settings: Mapping[str, Any], target_iters: int,
                    normalization: Normalization | None, *, dataset: str, split: str, count: int,
                    image_shape: Sequence[int], chunk_size: int,
                    dataset_config: Mapping[str, Any] | None = None,
                    fingerprint: str | None = None,
                    solver: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest that identifies a target cache (builders write it; readers compare against it).

    ``solver`` names how the target states are computed: ``{"name": "cold"}`` (the default: cold LCA
    for ``target_iters`` steps) or ``{"name": "continuation", "start_factor", "stages", "anneal_frac"}``
    (λ-continuation, :mod:`warplca.lca.continuation`).

    ``lca_settings`` is :meth:`LCA.settings`; its ``iters`` is ignored (``target_iters`` counts).
    ``dataset_config`` is filtered of keys that do not change the images (:data:`VOLATILE_DATA_KEYS`).
    """
    if not isinstance(target_iters, int) or isinstance(target_iters, bool) or target_iters < 1:
        raise ValueError(f"target_iters must be an integer ≥ 1, got {target_iters!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer ≥ 1, got {chunk_size!r}")
    if count < 1:
        raise ValueError(f"count must be ≥ 1, got {count}")
    c, h, w = (int(v) for v in image_shape)
    if c != dictionary.in_channels:
        raise ValueError(f"images have {c} channels, the dictionary {dictionary.in_channels}")
    config = {k: v for k, v in (dataset_config or {}).items() if k not in VOLATILE_DATA_KEYS}
    s = dict(lca_settings)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dictionary": dictionary.fingerprint(),
        "dictionary_config": dictionary.config(),
        "threshold": s.get("threshold", "hard"),
        "lam": s.get("lam", 1.0),
        "tau": s.get("tau", 100.0),
        "nonneg": s.get("nonneg", False),
        "theta": s.get("theta", 0.5),
        "tol": s.get("tol"),
        "target_iters": target_iters,
        "solver": normalize_solver(solver),
        "normalization": None if normalization is None else normalization.to_dict(),
        "dataset": dataset,
        "dataset_config": config,
        "data_fingerprint": fingerprint,
        "split": split,
        "count": int(count),
        "image_shape": [c, h, w],
        "shape": [int(count), *dictionary.code_shape(h, w)],
        "dtype": np.dtype(DTYPE).name,
        "chunk_size": chunk_size,
        "n_chunks": math.ceil(count / chunk_size),
    }
    return _jsonable(manifest)


def normalize_solver(solver: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Canonical target-solver description: ``{"name": "cold"}`` or continuation with all parameters."""
    if solver is None or solver == "cold":
        return {"name": "cold"}
    if isinstance(solver, str):
        solver = {"name": solver}
    spec = dict(solver)
    name = spec.pop("name", "cold")
    if name == "cold":
        if spec:
            raise ValueError(f"the cold target solver takes no parameters, got {sorted(spec)}")
        return {"name": "cold"}
    if name != "continuation":
        raise ValueError(f"targets.solver must be 'cold' or 'continuation', got {name!r}")
    params = asdict(Continuation(**spec))  # validates the parameters
    return {"name": "continuation", **params}


def manifest_diff(found: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (found, expected)}`` for every identifying key of ``expected`` that ``found`` differs in."""
    expected = _jsonable(dict(expected))
    diff = {}
    for key, want in expected.items():
        if key in INFO_KEYS:
            continue
        have = found.get(key, "<missing>")
        if have != want:
            diff[key] = (have, want)
    return diff


def _mismatch_message(directory: Path, diff: Mapping[str, tuple[Any, Any]]) -> str:
    lines = [f"  {k}: cache has {_short(v[0])}, current config wants {_short(v[1])}" for k, v in diff.items()]
    return (f"{directory}: the state-target cache was built with different settings "
            f"(differing keys: {', '.join(diff)}):\n" + "\n".join(lines) +
            "\nRebuild it (force=true / overwrite=True) or use a new run directory.")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a .npy file, without reading its data."""
    mm = np.load(path, mmap_mode="r")
    try:
        return int(mm.offset), tuple(mm.shape), mm.dtype
    finally:
        del mm


def _create_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Create an all-zero (sparse) float32 .npy of ``shape`` atomically."""
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=shape)
        mm.flush()
        del mm


class _RowFile:
    """Positioned reads/writes of rows of a .npy file (one fd per process, reopened after fork/pickle)."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        self.offset, self.shape, dtype = _npy_layout(self.path)
        if dtype != np.dtype(DTYPE):
            raise ValueError(f"{self.path}: expected dtype {np.dtype(DTYPE).name}, found {dtype}")
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(DTYPE).itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh (stop − start, *row_shape) array."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.shape[0]} rows")
        n = (stop - start) * self.row_bytes
        buf = bytearray(n)
        view = memoryview(buf)
        fd, pos, got = self._handle(), self.offset + start * self.row_bytes, 0
        while got < n:
            k = os.preadv(fd, [view[got:]], pos + got)
            if k == 0:
                raise ValueError(f"{self.path}: truncated (wanted rows [{start}, {stop}))")
            got += k
        return np.frombuffer(buf, dtype=DTYPE).reshape(stop - start, *self.row_shape)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at row ``start`` (no sync; call :meth:`sync`)."""
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        if rows.shape[1:] != self.row_shape or start + rows.shape[0] > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit at {start} in {self.shape}")
        data = memoryview(rows).cast("B")
        fd, pos, done = self._handle(), self.offset + start * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], pos + done)

    def sync(self) -> None:
        os.fsync(self._handle())


# -------------------------------------------------------------------------------------------------
# the reader
# -------------------------------------------------------------------------------------------------


class TargetCache:
    """A state-target cache directory (see the module doc). Use :meth:`open` to read a complete one."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: no state-target cache here ({MANIFEST} missing)")
        self.manifest = _read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} manifest (format {self.manifest.get('format')!r})")
        if int(self.manifest.get("version", 0)) > VERSION:
            raise ValueError(f"{path}: written by a newer warplca (version {self.manifest['version']})")
        self._rows: _RowFile | None = None

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike, expected: Mapping[str, Any] | None = None,
             require_complete: bool = True) -> TargetCache:
        """Open a cache for reading: refuses a manifest that differs from ``expected`` (naming the
        differing keys) and, unless ``require_complete=False``, an incomplete cache."""
        cache = cls(directory)
        if expected is not None:
            diff = manifest_diff(cache.manifest, expected)
            if diff:
                raise TargetCacheMismatchError(_mismatch_message(cache.directory, diff))
        if require_complete:
            missing = cache.missing_chunks()
            if missing:
                raise TargetCacheIncompleteError(
                    f"{cache.directory}: incomplete state-target cache ({cache.n_chunks - len(missing)} of "
                    f"{cache.n_chunks} chunks done; first missing: {missing[:5]}); build it again to resume")
            cache.check_file()
        return cache

    def check_file(self) -> None:
        """ValueError unless ``states.npy`` exists with the manifest's shape and dtype."""
        path = self.states_path
        if not path.is_file():
            raise ValueError(f"{path}: missing (the cache directory is damaged; rebuild it)")
        try:
            _, shape, dtype = _npy_layout(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .npy file ({exc}); rebuild the cache") from exc
        want = tuple(self.manifest["shape"])
        if shape != want or dtype != np.dtype(DTYPE):
            raise ValueError(f"{path}: holds {shape} {dtype}, the manifest says {want} {np.dtype(DTYPE)}")

    # -- layout ---------------------------------------------------------------------------------
    @property
    def states_path(self) -> Path:
        return self.directory / STATES

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, K, H', W')."""
        return tuple(self.manifest["shape"])

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk ``i``."""
        return i * self.chunk_size, min((i + 1) * self.chunk_size, self.count)

    def marker(self, i: int) -> Path:
        return self.directory / CHUNKS / f"{i}.done"

    def missing_chunks(self) -> list[int]:
        """Chunks without a completion marker, in order."""
        done = _done_chunks(self.directory)
        return [i for i in range(self.n_chunks) if i not in done]

    @property
    def is_complete(self) -> bool:
        return not self.missing_chunks()

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TargetCache({str(self.directory)!r}, split={m['split']!r}, shape={tuple(m['shape'])}, "
                f"target_iters={m['target_iters']}, complete={self.is_complete})")

    # -- data -----------------------------------------------------------------------------------
    def _file(self) -> _RowFile:
        if self._rows is None:
            self._rows = _RowFile(self.states_path)
        return self._rows

    def read(self, start: int, stop: int | None = None) -> Tensor:
        """States of rows [start, stop) (one row, without the batch axis, when ``stop`` is None)."""
        rows = self._file().read(start, start + 1 if stop is None else stop)
        t = torch.from_numpy(rows)
        return t[0] if stop is None else t

    def states(self) -> np.memmap:
        """All states as a read-only memory map (for analysis; pages are loaded on access)."""
        return np.load(self.states_path, mmap_mode="r")

    def chunk_info(self, i: int) -> dict[str, Any]:
        return _read_json(self.marker(i))

    def stats(self) -> dict[str, float]:
        """Mean cold-LCA energy and ℓ0 per image of the targets (from the chunk markers)."""
        energy = l0 = n = 0.0
        for i in range(self.n_chunks):
            if not self.marker(i).is_file():
                continue
            info = self.chunk_info(i)
            energy += info["energy_sum"]
            l0 += info["l0_sum"]
            n += info["stop"] - info["start"]
        return {"count": n, "energy": energy / max(n, 1.0), "l0_per_image": l0 / max(n, 1.0)}

    def verify(self) -> None:
        """Re-hash every finished chunk against its marker; ValueError naming the first bad chunk."""
        for i in range(self.n_chunks):
            if not self.marker(i).is_file():
                continue
            start, stop = self.chunk_range(i)
            digest = hashlib.sha256(self._file().read(start, stop).tobytes()).hexdigest()
            if digest != self.chunk_info(i)["sha256"]:
                raise ValueError(f"{self.directory}: chunk {i} (rows {start}..{stop}) does not match its "
                                 f"checksum; delete {self.marker(i)} and build again")


def _done_chunks(directory: Path) -> set[int]:
    folder = directory / CHUNKS
    if not folder.is_dir():
        return set()
    done = set()
    for entry in os.scandir(folder):
        name = entry.name
        if name.endswith(".done") and name[:-5].isdigit():
            done.add(int(name[:-5]))
    return done


# -------------------------------------------------------------------------------------------------
# the builder (a LightningModule run by trainer.predict)
# -------------------------------------------------------------------------------------------------


def _image(item: Any) -> Tensor:
    """The image of a dataset item: ``(image, label)`` tuples or bare images."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"dataset items must be (C, H, W) images or (image, label) pairs, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    return x


class _ChunkDataset(Dataset):
    """Item j = (chunk id, images of that chunk's rows) for the chunks still to compute."""

    def __init__(self, dataset: Dataset, chunks: Sequence[int], chunk_size: int, count: int) -> None:
        self.dataset, self.chunks, self.chunk_size, self.count = dataset, list(chunks), chunk_size, count

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> tuple[int, Tensor]:
        i = self.chunks[j]
        start, stop = i * self.chunk_size, min((i + 1) * self.chunk_size, self.count)
        return i, torch.stack([_image(self.dataset[k]) for k in range(start, stop)])


def _single(items: list[Any]) -> Any:
    """collate_fn of the chunk loader (batch_size=1): the one chunk, unbatched."""
    return items[0]


class TargetBuilder(pl.LightningModule):
    """Computes the cold-LCA target states of a dataset into a cache directory (``trainer.predict``).

    One predict step = one chunk: the chunk's images are normalised, coded by cold LCA for
    ``target_iters`` steps in sub-batches of ``batch_size``, written at their row offsets and fsync'ed;
    then the chunk's marker is renamed into place. Finished chunks are skipped, so calling
    ``trainer.predict`` again resumes a crashed build. ``overwrite=True`` wipes any existing cache
    in ``directory`` first (a mismatching one is refused otherwise).

    Args:
        directory: the cache directory (created).
        dataset: the deterministic split; item i → row i (``(image in [0, 1], label)`` items).
        dictionary: the fixed atoms (copied and frozen).
        lca_settings: :meth:`LCA.settings` of the run (its ``iters`` is replaced by ``target_iters``).
        manifest: from :func:`target_manifest` (must describe the same dictionary, settings and data).
        normalization: applied to the images before coding (None: images are coded as they are).
        batch_size: LCA batch within a chunk.
        num_workers: DataLoader workers loading chunk images.
    """

    def __init__(self, directory: str | os.PathLike, dataset: Dataset, dictionary: ConvDictionary,
                 lca_settings: Mapping[str, Any], manifest: Mapping[str, Any],
                 normalization: Normalization | None = None, batch_size: int = 128, num_workers: int = 0,
                 overwrite: bool = False, fsync: bool = True) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.dataset = dataset
        self.dictionary = copy.deepcopy(dictionary).requires_grad_(False)
        if self.dictionary.fingerprint() != manifest["dictionary"]:
            raise ValueError("the manifest describes another dictionary than the one given")
        settings = {k: v for k, v in dict(lca_settings).items() if k != "iters"}
        self.target_iters = int(manifest["target_iters"])
        self.lca = LCA(self.dictionary, iters=self.target_iters, **settings)
        solver = dict(manifest.get("solver") or {"name": "cold"})
        self.continuation = (Continuation(**{k: v for k, v in solver.items() if k != "name"})
                             if solver.get("name") == "continuation" else None)
        self.normalization = normalization
        self.manifest = _jsonable(dict(manifest))
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.overwrite = bool(overwrite)
        self.fsync = bool(fsync)
        self.chunk_size = int(self.manifest["chunk_size"])
        self.count = int(self.manifest["count"])
        self.remaining: list[int] = []
        self.computed: list[int] = []  # chunks this process computed (tests count them)
        self._rows: _RowFile | None = None
        if len(dataset) < self.count:  # type: ignore[arg-type]
            raise ValueError(f"the dataset has {len(dataset)} items, the manifest {self.count}")  # type: ignore[arg-type]

    # -- preparation (rank 0 writes, everyone agrees on the chunks left) ------------------------
    def prepare(self) -> list[int]:
        """Create or validate the directory (rank 0's job); returns the chunks still to compute."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        manifest_path = d / MANIFEST
        if self.overwrite:
            self._wipe()
        if manifest_path.is_file():
            found = _read_json(manifest_path)
            diff = manifest_diff(found, self.manifest)
            if diff:
                raise TargetCacheMismatchError(_mismatch_message(d, diff))
            try:
                TargetCache(d).check_file()
            except ValueError as exc:
                log.warning("%s: %s; recomputing every chunk", d, exc)
                self._wipe()
        if not manifest_path.is_file():
            # fresh cache: states first, manifest last (a manifest implies a valid states file)
            shutil.rmtree(d / CHUNKS, ignore_errors=True)
            (d / COMPLETE).unlink(missing_ok=True)
            _create_npy(d / STATES, tuple(self.manifest["shape"]))
            manifest = {**self.manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "tau_resolved": self.lca.resolve_tau(*self.manifest["image_shape"][1:])}
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
        (d / CHUNKS).mkdir(exist_ok=True)
        done = _done_chunks(d)
        return [i for i in range(int(self.manifest["n_chunks"])) if i not in done]

    def _wipe(self) -> None:
        d = self.directory
        for name in (MANIFEST, STATES, COMPLETE):
            (d / name).unlink(missing_ok=True)
        shutil.rmtree(d / CHUNKS, ignore_errors=True)

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        manifest_path = self.directory / MANIFEST
        if manifest_path.is_file() and not self.overwrite:  # every rank refuses, so none waits forever
            diff = manifest_diff(_read_json(manifest_path), self.manifest)
            if diff:
                raise TargetCacheMismatchError(_mismatch_message(self.directory, diff))
        remaining = self.prepare() if self.trainer.is_global_zero else None
        self.remaining = list(strategy.broadcast(remaining, src=0))
        n_chunks = int(self.manifest["n_chunks"])
        if self.trainer.is_global_zero:
            log.info("state targets %s [%s]: %d of %d chunks cached; computing %d chunks (%d images × %d "
                     "LCA steps)", self.directory, self.manifest["split"], n_chunks - len(self.remaining),
                     n_chunks, len(self.remaining), self._rows_of(self.remaining), self.target_iters)

    def _rows_of(self, chunks: Sequence[int]) -> int:
        return sum(min((i + 1) * self.chunk_size, self.count) - i * self.chunk_size for i in chunks)

    def predict_dataloader(self) -> DataLoader:
        ds = _ChunkDataset(self.dataset, self.remaining, self.chunk_size, self.count)
        return DataLoader(ds, batch_size=1, shuffle=False, collate_fn=_single, num_workers=self.num_workers,
                          persistent_workers=False)

    # -- one chunk ------------------------------------------------------------------------------
    def compute_states(self, images: Tensor) -> tuple[Tensor, float, float]:
        """Cold-LCA states (n, K, H', W') of [0, 1] images, with the sums of their energies and ℓ0."""
        energy = l0 = 0.0
        out = []
        device_type = images.device.type
        with torch.autocast(device_type=device_type, enabled=False):  # targets are always float32
            for sub in images.split(self.batch_size):
                x = sub.to(torch.float32)
                if self.normalization is not None:
                    x = self.normalization.apply(x)
                if self.continuation is None:
                    res = self.lca(x, iters=self.target_iters)
                else:
                    res = solve_continuation(self.lca, x, self.target_iters, self.continuation)
                out.append(res.u.contiguous())
                energy += float(res.energy.double().sum()) if res.energy is not None else math.nan
                l0 += float(torch.count_nonzero(res.a))
        return torch.cat(out), energy, l0

    def predict_step(self, batch: tuple[int, Tensor], batch_idx: int) -> int:
        chunk, images = batch
        chunk = int(chunk)
        start, stop = chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.count)
        if images.shape[0] != stop - start:
            raise RuntimeError(f"chunk {chunk}: got {images.shape[0]} images for rows [{start}, {stop})")
        t0 = time.perf_counter()
        states, energy, l0 = self.compute_states(images)
        rows = states.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._rows is None:
            self._rows = _RowFile(self.directory / STATES, writable=True)
        self._rows.write(start, rows)
        if self.fsync:
            self._rows.sync()
        info = {"chunk": chunk, "start": start, "stop": stop,
                "sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
                "energy_sum": energy, "l0_sum": l0, "seconds": time.perf_counter() - t0}
        write_text_atomic(self.directory / CHUNKS / f"{chunk}.done", json.dumps(info))
        self.computed.append(chunk)
        return chunk

    def on_predict_end(self) -> None:
        strategy = self.trainer.strategy
        strategy.barrier("target_cache_done")
        if self.trainer.is_global_zero:
            cache = TargetCache(self.directory)
            if cache.is_complete:
                summary = {**cache.stats(), "n_chunks": cache.n_chunks, "split": self.manifest["split"]}
                write_text_atomic(self.directory / COMPLETE, json.dumps(summary, indent=2))
        strategy.barrier("target_cache_complete")
        if self._rows is not None:
            self._rows.close()
            self._rows = None


def build_target_cache(directory: str | os.PathLike, dataset: Dataset, dictionary: ConvDictionary,
                       lca: LCA | Mapping[str, Any], target_iters: int,
                       normalization: Normalization | None = None, *, dataset_name: str = "dataset",
                       split: str = "train", dataset_config: Mapping[str, Any] | None = None,
                       chunk_size: int = 512, batch_size: int = 128, limit: int | None = None,
                       num_workers: int = 0, trainer: pl.Trainer | None = None,
                       overwrite: bool = False, solver: Mapping[str, Any] | str | None = None) -> TargetCache:
    """Build (or resume, or reuse) the state-target cache of ``dataset`` in ``directory``; returns it open.

    ``limit`` caches only the first ``limit`` items. ``trainer`` defaults to a CPU trainer without
    loggers; pass the run's (``ctx.trainer("targets")``) to get its accelerator, devices/DDP and
    progress bar. Raises :class:`TargetCacheMismatchError` when an existing cache differs (unless
    ``overwrite``) and :class:`TargetCacheIncompleteError` when the loop stopped early.
    """
    settings = lca.settings() if isinstance(lca, LCA) else dict(lca)
    manifest = expected_manifest(dataset, dictionary, settings, target_iters, normalization,
                                 dataset_name=dataset_name, split=split, dataset_config=dataset_config,
                                 chunk_size=chunk_size, limit=limit, solver=solver)
    directory = Path(directory)
    if not overwrite:
        try:
            return TargetCache.open(directory, manifest)
        except (FileNotFoundError, TargetCacheIncompleteError):
            pass
    builder = TargetBuilder(directory, dataset, dictionary, settings, manifest, normalization,
                            batch_size=batch_size, num_workers=num_workers, overwrite=overwrite)
    if trainer is None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_model_summary=False)
    trainer.predict(builder, return_predictions=False)
    return TargetCache.open(directory, manifest)


def expected_manifest(dataset: Dataset, dictionary: ConvDictionary, lca_settings: Mapping[str, Any],
                      target_iters: int, normalization: Normalization | None, *, dataset_name: str,
                      split: str, dataset_config: Mapping[str, Any] | None = None, chunk_size: int = 512,
                      limit: int | None = None,
                      solver: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
    """:func:`target_manifest` for a dataset object (count, image shape and fingerprint read from it)."""
    n = len(dataset)  # type: ignore[arg-type]
    count = n if limit is None else min(n, int(limit))
    if count < 1:
        raise ValueError(f"split {split!r} of {dataset_name} is empty (limit={limit})")
    shape = tuple(_image(dataset[0]).shape)
    return target_manifest(dictionary, lca_settings, target_iters, normalization, dataset=dataset_name,
                           split=split, count=count, image_shape=shape, chunk_size=chunk_size,
                           dataset_config=dataset_config, fingerprint=data_fingerprint(dataset, count),
                           solver=solver)


# -------------------------------------------------------------------------------------------------
# reading for training
# -------------------------------------------------------------------------------------------------


class TargetDataset(Dataset):
    """(image in [0, 1], target states) pairs: images from the deterministic split, states read lazily
    from the cache (one ``pread`` per item; nothing is loaded up front)."""

    def __init__(self, cache: TargetCache, images: Dataset, return_index: bool = False) -> None:
        if len(images) < cache.count:  # type: ignore[arg-type]
            raise ValueError(f"{cache.directory}: the cache has {cache.count} rows but the image dataset "
                             f"only {len(images)} items")  # type: ignore[arg-type]
        shape = tuple(_image(images[0]).shape)
        if list(shape) != list(cache.manifest["image_shape"]):
            raise ValueError(f"{cache.directory}: cached states belong to images "
                             f"{cache.manifest['image_shape']}, the dataset yields {list(shape)}")
        self.cache = cache
        self.images = images
        self.return_index = return_index

    def __len__(self) -> int:
        return self.cache.count

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        x = _image(self.images[i])
        u = self.cache.read(i)
        return (x, u, torch.tensor(i)) if self.return_index else (x, u)


class TargetDataModule(pl.LightningDataModule):
    """Loaders of (image, state) pairs for WARP-CNN regression: shuffled (seeded) train, fixed val."""

    def __init__(self, train: TargetDataset, val: TargetDataset | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.seed, self.pin_memory = int(seed), bool(pin_memory)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        if shuffle:  # order = f(seed, epoch), resumable mid-epoch, sharded like one big batch under DDP
            from warplca.data.resumable import ResumableDataLoader

            return ResumableDataLoader(ds, batch_size=self.batch_size, seed=self.seed, order="shuffle",
                                       num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                       pin_memory=self.pin_memory)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)
