"""Provenance of run artifacts: the resolved config settings each artifact was made with.

When a stage writes its artifact, the values of the config keys it depends on (declared in
:data:`warplca.tasks.stages.STAGES`) are recorded in ``<run_dir>/provenance/<stage>.json``. A later run
that would reuse the artifact compares that record with its own config and refuses
(:class:`ProvenanceMismatchError`) when any recorded setting differs, so a run directory never mixes
artifacts made under different settings without saying so. Keys that only change where or how fast a
stage runs, or what it logs (:func:`is_volatile`), are never recorded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from warplca.data.target_store import VOLATILE_DATA_KEYS
from warplca.serialization import PROVENANCE_DIR, read_json_object, to_json_value, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["ProvenanceMismatchError", "differences", "is_volatile", "read_record", "record_file",
           "resolve_settings", "verify", "write_record"]

#: keys, anywhere in the config, that only say how data is loaded
_LOADING_KEYS = frozenset({"num_workers", "pin_memory", "persistent_workers"})
#: keys of the ``trainer`` group and of each ``model.<stage>.trainer`` that only say where a stage runs or
#: what it logs
_TRAINER_KEYS = frozenset({"accelerator", "devices", "num_nodes", "strategy", "benchmark", "default_root_dir",
                           "logger", "callbacks", "profiler", "enable_progress_bar", "enable_model_summary",
                           "enable_checkpointing", "log_every_n_steps", "check_val_every_n_epoch",
                           "val_check_interval", "num_sanity_val_steps", "detect_anomaly", "barebones"})
#: single keys that only change speed (the LCA backends are exact alike) or logging
_KEYS = frozenset({"lca.compile", "lca.backend", "targets.batch_size", "targets.splits",
                   "model.dictionary.log_images_every_n_epochs", "model.dictionary.n_log_images",
                   "model.warp.lca_eval_every_n_epochs"})
_ABSENT = "(not set)"


def is_volatile(key: str) -> bool:
    """Whether the dotted config ``key`` changes no artifact: data loading (``*.num_workers``, …, and the
    ``data`` keys the target cache ignores too, :data:`~warplca.data.target_store.VOLATILE_DATA_KEYS`),
    where a Trainer runs and what it logs, LCA speed switches, and which target splits are cached (each
    split's cache is checked on its own)."""
    parts = key.split(".")
    if parts[-1] in _LOADING_KEYS or key in _KEYS:
        return True
    if len(parts) == 2 and parts[0] == "data" and parts[1] in VOLATILE_DATA_KEYS:
        return True
    return "trainer" in parts[:-1] and parts[-1] in _TRAINER_KEYS


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def resolve_settings(cfg: DictConfig, keys: Iterable[str]) -> dict[str, Any]:
    """The resolved values under the dotted config prefixes ``keys`` as flat ``a.b.c`` keys (plain JSON
    values); a prefix written ``-a.b`` leaves that subtree out, absent keys and volatile ones
    (:func:`is_volatile`) are left out."""
    keys = list(keys)
    excluded = [k[1:] for k in keys if k.startswith("-")]
    out: dict[str, Any] = {}
    for prefix in (k for k in keys if not k.startswith("-")):
        node = OmegaConf.select(cfg, prefix, default=_ABSENT)
        if OmegaConf.is_config(node):
            node = OmegaConf.to_container(node, resolve=True)
        if node is not _ABSENT:
            out.update(_flatten(node, prefix))
    return {k: to_json_value(v) for k, v in sorted(out.items()) if not is_volatile(k)
            and not any(k == e or k.startswith(f"{e}.") for e in excluded)}


def record_file(run_dir: str | os.PathLike, stage: str) -> Path:
    """``<run_dir>/provenance/<stage>.json``."""
    return Path(run_dir) / PROVENANCE_DIR / f"{stage}.json"


def read_record(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The settings recorded for ``stage``'s artifact, or None when there is no record."""
    path = record_file(run_dir, stage)
    if not path.is_file():
        return None
    settings = read_json_object(path).get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a provenance record (no settings); delete it to record anew")
    return settings


def write_record(run_dir: str | os.PathLike, stage: str, settings: Mapping[str, Any]) -> Path:
    """Record ``settings`` as what ``stage``'s artifact was made with (atomic; strict JSON)."""
    return write_json_atomic(record_file(run_dir, stage), {"stage": stage, "settings": dict(settings)})


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (recorded, current)`` for every key whose value differs, or that only one side has."""
    current = to_json_value(dict(current))  # compared in the form records are stored in
    return {k: (recorded.get(k, _ABSENT), current.get(k, _ABSENT)) for k in sorted({*recorded, *current})
            if recorded.get(k, _ABSENT) != current.get(k, _ABSENT)}


def verify(run_dir: str | os.PathLike, stage: str, artifact: str,
           current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """How the settings recorded for ``stage``'s existing ``artifact`` differ from ``current`` (empty:
    reusable), or None when it has no record: made by an older version, it is trusted, with a warning."""
    recorded = read_record(run_dir, stage)
    if recorded is not None:
        return differences(recorded, current)
    log.warning("%s: %s has no provenance record (made by an older version); reusing it as made with this "
                "config's settings, which are recorded once this run succeeds. If it was not, redo it with "
                "force=true", stage, artifact)
    return None


def _show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)


class ProvenanceMismatchError(ValueError):
    """Artifacts in the run directory were made with other settings than the current config's; ``stale``
    maps each stage to its differing keys, ``key -> (recorded, current)``."""

    def __init__(self, run_dir: str | os.PathLike, stale: Mapping[str, Mapping[str, tuple[Any, Any]]],
                 artifacts: Mapping[str, str], redo: Sequence[str]) -> None:
        self.run_dir, self.stale = Path(run_dir), {k: dict(v) for k, v in stale.items()}
        lines = [f"{self.run_dir} holds artifacts made with other settings than this config:"]
        for stage, diff in self.stale.items():
            lines.append(f"  {stage} ({artifacts.get(stage, '?')}):")
            lines += [f"    {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in diff.items()]
        lines.append(f"Redo them with force=true stages=[{','.join(redo)}], or use another run_dir=<dir> "
                     f"(records in {self.run_dir / PROVENANCE_DIR}).")
        super().__init__("\n".join(lines))
