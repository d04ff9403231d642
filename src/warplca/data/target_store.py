"""The state-target cache on disk: its layout, the manifest that identifies it, and the reader.

A cache directory holds::

    <dir>/manifest.json     what the targets are (dictionary fingerprint, LCA settings, normalisation,
                            dataset, split, count, shape, chunk size, ...)
    <dir>/states.npy        float32 (N, K, H', W') in the .npy format
    <dir>/chunks/<i>.done   one marker per finished chunk: JSON with the rows' SHA-256 and statistics,
                            written atomically *after* the rows are fsync'ed (only then does the chunk count)
    <dir>/COMPLETE          written by rank 0 once every chunk is done (summary statistics)

Rows are read and written with ``os.pread``/``os.pwrite`` rather than a mapping, so a process holds at
most a chunk or an item (mapped pages would grow its resident set). Built by :mod:`warplca.data.target_cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from warplca.data.normalization import Normalization
from warplca.lca.continuation import Continuation
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA
from warplca.serialization import atomic_path
from warplca.settings import defaults

__all__ = ["FORMAT", "TargetCache", "TargetCacheIncompleteError", "TargetCacheMismatchError",
           "check_manifest", "chunk_range", "data_fingerprint", "expected_manifest", "item_image",
           "manifest_diff", "normalize_solver", "target_manifest"]

FORMAT = "warplca.target_cache"
VERSION = 1
MANIFEST = "manifest.json"
STATES = "states.npy"
CHUNKS = "chunks"
COMPLETE = "COMPLETE"
DTYPE = np.dtype(np.float32)

#: manifest keys that describe, not identify, a cache (never compared; ``data_fingerprint`` and ``count``
#: identify the images, not the dataset config)
INFO_KEYS = frozenset({"created", "warplca_version", "tau_resolved", "dataset_config"})
#: datamodule config keys that do not change the images of a split (dropped from ``dataset_config``)
VOLATILE_DATA_KEYS = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers", "download",
                                "data_dir", "root"})
#: the LCA settings a manifest records (the others do not change the states: iters is target_iters)
MANIFEST_LCA_KEYS = ("threshold", "lam", "tau", "nonneg", "theta", "tol")
LCA_DEFAULTS = defaults(LCA)


class TargetCacheMismatchError(ValueError):
    """The cache on disk was built with other settings than the ones asked for."""


class TargetCacheIncompleteError(RuntimeError):
    """The cache on disk is missing chunks (an interrupted build): build it again to resume."""


def jsonable(obj: Any) -> Any:
    """``obj`` after a JSON round trip (tuples → lists, keys → str): the form manifests are compared in."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def item_image(item: Any) -> Tensor:
    """The image of a dataset item: ``(image, label)`` tuples or bare images."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"dataset items must be (C, H, W) images or (image, label) pairs, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    return x


def data_fingerprint(dataset: Dataset, count: int | None = None, probe: int = 16) -> str:
    """SHA-256 (16 hex) of the count and of ``probe`` first plus ``probe`` evenly spaced images among the
    first ``count``: identifies the images of a split whatever config produced them."""
    n = len(dataset) if count is None else count  # type: ignore[arg-type]
    h = hashlib.sha256(f"{n}|".encode())
    spaced = np.linspace(0, n - 1, num=min(n, probe)).round().astype(int).tolist()
    for i in sorted(set(range(min(n, probe))) | set(spaced)):
        x = item_image(dataset[i])
        h.update(str(tuple(x.shape)).encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def target_manifest(dictionary: ConvDictionary, lca_settings: Mapping[str, Any], target_iters: int,
                    normalization: Normalization | None, *, dataset: str, split: str, count: int,
                    image_shape: Sequence[int], chunk_size: int,
                    dataset_config: Mapping[str, Any] | None = None, fingerprint: str | None = None,
                    solver: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest that identifies a target cache (builders write it; readers compare against it).

    ``solver``: see :func:`normalize_solver`. ``lca_settings`` is :meth:`LCA.settings` (its ``iters`` is
    ignored); ``dataset_config`` loses the :data:`VOLATILE_DATA_KEYS`.
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
    return jsonable({
        "format": FORMAT, "version": VERSION,
        "dictionary": dictionary.fingerprint(), "dictionary_config": dictionary.config(),
        **{k: s.get(k, LCA_DEFAULTS[k]) for k in MANIFEST_LCA_KEYS},
        "target_iters": target_iters, "solver": normalize_solver(solver),
        "normalization": None if normalization is None else normalization.to_dict(),
        "dataset": dataset, "dataset_config": config, "data_fingerprint": fingerprint, "split": split,
        "count": int(count), "image_shape": [c, h, w], "shape": [int(count), *dictionary.code_shape(h, w)],
        "dtype": DTYPE.name, "chunk_size": chunk_size, "n_chunks": math.ceil(count / chunk_size),
    })


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
    shape = tuple(item_image(dataset[0]).shape)
    return target_manifest(dictionary, lca_settings, target_iters, normalization, dataset=dataset_name,
                           split=split, count=count, image_shape=shape, chunk_size=chunk_size,
                           dataset_config=dataset_config, fingerprint=data_fingerprint(dataset, count),
                           solver=solver)


def normalize_solver(solver: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Canonical target-solver description: ``{"name": "cold"}`` or continuation with all parameters."""
    spec = {"name": solver} if isinstance(solver, str) else dict(solver or {})
    name = spec.pop("name", "cold")
    if name == "cold":
        if spec:
            raise ValueError(f"the cold target solver takes no parameters, got {sorted(spec)}")
        return {"name": "cold"}
    if name != "continuation":
        raise ValueError(f"targets.solver must be 'cold' or 'continuation', got {name!r}")
    return {"name": "continuation", **asdict(Continuation(**spec))}  # Continuation validates them


def solver_continuation(solver: Mapping[str, Any] | str | None) -> Continuation | None:
    """The λ schedule of a target-solver description (:func:`normalize_solver`); None for cold LCA."""
    spec = normalize_solver(solver)
    return None if spec.pop("name") == "cold" else Continuation(**spec)


def manifest_diff(found: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (found, expected)}`` for every identifying key of ``expected`` that ``found`` differs in."""
    pairs = ((k, found.get(k, "<missing>"), want) for k, want in jsonable(dict(expected)).items())
    return {k: (have, want) for k, have, want in pairs if k not in INFO_KEYS and have != want}


def check_manifest(directory: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """:class:`TargetCacheMismatchError` naming the differing keys when ``found`` is not ``expected``."""
    diff = manifest_diff(found, expected)
    if not diff:
        return

    def short(value: Any, limit: int = 120) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    lines = [f"  {k}: cache has {short(v[0])}, current config wants {short(v[1])}" for k, v in diff.items()]
    raise TargetCacheMismatchError(
        f"{directory}: the state-target cache was built with different settings (differing keys: "
        f"{', '.join(diff)}):\n" + "\n".join(lines) +
        "\nRebuild it (force=true / overwrite=True) or use a new run directory.")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc


def chunk_range(i: int, chunk_size: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``i`` of a cache of ``count`` rows."""
    return i * chunk_size, min((i + 1) * chunk_size, count)


def done_chunks(directory: Path) -> set[int]:
    """The chunks of the cache in ``directory`` that have a completion marker."""
    folder = directory / CHUNKS
    if not folder.is_dir():
        return set()
    names = (entry.name for entry in os.scandir(folder))
    return {int(n[:-5]) for n in names if n.endswith(".done") and n[:-5].isdigit()}


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a .npy file, without reading its data."""
    mm = np.load(path, mmap_mode="r")
    return int(mm.offset), tuple(mm.shape), mm.dtype


def create_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Create an all-zero (sparse) float32 .npy of ``shape`` atomically."""
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=shape)
        mm.flush()
        del mm


class RowFile:
    """Positioned reads/writes of rows of a .npy file (one fd per process, reopened after fork/pickle)."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        self.offset, self.shape, dtype = _npy_layout(self.path)
        if dtype != DTYPE:
            raise ValueError(f"{self.path}: expected dtype {DTYPE.name}, found {dtype}")
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape)) * DTYPE.itemsize
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
        fd, pos, got = self._handle(), self.offset + start * self.row_bytes, 0
        while got < n:
            k = os.preadv(fd, [memoryview(buf)[got:]], pos + got)
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


class TargetCache:
    """A state-target cache directory (see the module doc). Use :meth:`open` to read a complete one."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: no state-target cache here ({MANIFEST} missing)")
        self.manifest = read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} manifest (format {self.manifest.get('format')!r})")
        if int(self.manifest.get("version", 0)) > VERSION:
            raise ValueError(f"{path}: written by a newer warplca (version {self.manifest['version']})")
        self._rows: RowFile | None = None

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike, expected: Mapping[str, Any] | None = None,
             require_complete: bool = True) -> TargetCache:
        """Open a cache for reading: refuses a manifest that differs from ``expected`` (naming the
        differing keys) and, unless ``require_complete=False``, an incomplete cache."""
        cache = cls(directory)
        if expected is not None:
            check_manifest(cache.directory, cache.manifest, expected)
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
        if shape != self.shape or dtype != DTYPE:
            raise ValueError(f"{path}: holds {shape} {dtype}, the manifest says {self.shape} {DTYPE}")

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
        return chunk_range(i, self.chunk_size, self.count)

    def marker(self, i: int) -> Path:
        return self.directory / CHUNKS / f"{i}.done"

    def missing_chunks(self) -> list[int]:
        """Chunks without a completion marker, in order."""
        done = done_chunks(self.directory)
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
    def _file(self) -> RowFile:
        if self._rows is None:
            self._rows = RowFile(self.states_path)
        return self._rows

    def read(self, start: int, stop: int | None = None) -> Tensor:
        """States of rows [start, stop) (one row, without the batch axis, when ``stop`` is None)."""
        t = torch.from_numpy(self._file().read(start, start + 1 if stop is None else stop))
        return t[0] if stop is None else t

    def states(self) -> np.memmap:
        """All states as a read-only memory map (for analysis; pages are loaded on access)."""
        return np.load(self.states_path, mmap_mode="r")

    def chunk_info(self, i: int) -> dict[str, Any]:
        return read_json(self.marker(i))

    def _done(self) -> list[int]:
        """Chunks with a completion marker, in order."""
        return [i for i in range(self.n_chunks) if self.marker(i).is_file()]

    def stats(self) -> dict[str, float]:
        """Mean cold-LCA energy and ℓ0 per image of the targets (from the chunk markers)."""
        infos = [self.chunk_info(i) for i in self._done()]
        n = float(sum(info["stop"] - info["start"] for info in infos))
        energy, l0 = (sum(info[key] for info in infos) for key in ("energy_sum", "l0_sum"))
        return {"count": n, "energy": energy / max(n, 1.0), "l0_per_image": l0 / max(n, 1.0)}

    def verify(self) -> None:
        """Re-hash every finished chunk against its marker; ValueError naming the first bad chunk."""
        for i in self._done():
            start, stop = self.chunk_range(i)
            digest = hashlib.sha256(self._file().read(start, stop).tobytes()).hexdigest()
            if digest != self.chunk_info(i)["sha256"]:
                raise ValueError(f"{self.directory}: chunk {i} (rows {start}..{stop}) does not match its "
                                 f"checksum; delete {self.marker(i)} and build again")
