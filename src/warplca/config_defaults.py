"""The shipped YAML configs as the only source of default values (never a copy in Python).

``option_defaults("targets", "default")`` is ``conf/targets/default.yaml`` as plain Python, interpolations
kept; ``primary_defaults("model.warp")`` the option ``train.yaml`` chooses. Imports nothing from warplca.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["config_dir", "fill_missing", "option_defaults", "primary_defaults", "primary_option"]


def config_dir() -> Path:
    """The Hydra config tree: ``warplca/conf`` inside an installed wheel (``setup.py`` copies it there),
    else the top-level ``conf/`` of the source checkout (editable installs, tests)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no Hydra configs: neither {package / 'conf'} nor {package.parents[1] / 'conf'} "
                            "holds train.yaml (reinstall warplca)")


def _load(path: Path) -> DictConfig:
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return node


@cache
def _option(group: str, option: str) -> DictConfig:
    path = config_dir() / group / f"{option}.yaml"
    node = _load(path)
    entries = list(node.pop("defaults", None) or [])
    if "_self_" not in entries:  # Hydra's default for a non-primary config: _self_ last
        entries.append("_self_")
    merged = OmegaConf.create({})
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        elif isinstance(entry, str):  # another option of the same group
            merged = OmegaConf.merge(merged, _option(group, entry))
        else:
            raise ValueError(f"{path}: defaults entry {entry!r} is not supported here (only options of "
                             f"the same group and _self_)")
    assert isinstance(merged, DictConfig)
    return merged


def option_defaults(group: str, option: str) -> dict[str, Any]:
    """``conf/<group>/<option>.yaml`` (through its own ``defaults:`` list) as a fresh plain dict."""
    out = OmegaConf.to_container(_option(group, option), resolve=False)
    assert isinstance(out, dict)
    return copy.deepcopy(out)


@cache
def _choices(primary: str) -> dict[str, tuple[str, str]]:
    """package -> (group, option) of the primary config's ``defaults:`` list (null options left out)."""
    node = _load(config_dir() / f"{primary}.yaml")
    out: dict[str, tuple[str, str]] = {}
    for entry in node.get("defaults") or []:
        for key, option in entry.items() if isinstance(entry, DictConfig) else ():
            if option is not None:
                group, _, package = str(key).partition("@")
                out[package or group] = (group, str(option))
    return out


def primary_option(package: str, primary: str = "train") -> tuple[str, str]:
    """(group, option) the primary config ``conf/<primary>.yaml`` chooses for ``package``."""
    choices = _choices(primary)
    if package not in choices:
        raise KeyError(f"conf/{primary}.yaml chooses no option for {package!r}; it chooses {sorted(choices)}")
    return choices[package]


def primary_defaults(package: str, primary: str = "train") -> dict[str, Any]:
    """The values of the option ``conf/<primary>.yaml`` chooses for ``package`` (e.g. ``targets``)."""
    return option_defaults(*primary_option(package, primary))


def fill_missing(values: dict[str, Any], defaults: dict[str, Any], whole: tuple[str, ...] = (),
                 prefix: str = "") -> dict[str, Any]:
    """``values`` with the keys it lacks taken from ``defaults`` (nested mappings filled the same way,
    except at the dotted paths in ``whole``: a mapping given there replaces the default one)."""
    out = dict(values)
    for key, default in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(default)
        elif isinstance(out[key], dict) and isinstance(default, dict) and f"{prefix}{key}" not in whole:
            out[key] = fill_missing(out[key], default, whole, f"{prefix}{key}.")
    return out
