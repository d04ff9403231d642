"""Checks that need two config groups, a file or the machine, run after every node has been checked against
its declaration (:mod:`warplca.config`): τ stable for the dictionary LCA will code with, data channels
matching a given dictionary, no script-relaunching DDP inside a basic-launcher multirun, CUDA visible when
asked for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from warplca.runtime import is_multirun
from warplca.settings import show

Problem = tuple[str, str]

__all__ = ["SCRIPT_STRATEGIES", "check_eval", "check_train", "data_channels", "multirun"]


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (None when absent or unresolvable: the node checks report that)."""
    v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _bad(key: str, value: Any, rule: str) -> Problem:
    return key, f"{key}={show(value)}: {rule}"


#: strategies that re-launch the script once per rank (``trainer.strategy``)
SCRIPT_STRATEGIES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")


def data_channels(cfg: DictConfig, key: str = "data") -> int | None:
    """The channel count the data config yields, from its class and flags (nothing is loaded)."""
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    from hydra.utils import get_method

    try:
        native = getattr(get_method(str(node.get("_target_"))), "native_channels", None)
    except Exception:
        return None
    if not isinstance(native, int):
        return None
    return 1 if node.get("grayscale", False) is True else 3 if node.get("rgb", False) is True else native


def multirun() -> bool:
    """Whether this process runs the jobs of a Hydra multirun itself (the basic launcher)."""
    if not is_multirun():
        return False
    launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or "")
    return launcher.endswith("BasicLauncher") or not launcher


def _relaunches_script(strategy: Any, devices: Any) -> bool:
    """Whether Lightning re-runs ``sys.argv`` once per rank (``strategy=ddp`` started as one process)."""
    if isinstance(strategy, Mapping):
        ddp = str(strategy.get("_target_", "")).endswith("DDPStrategy")
        if not ddp or strategy.get("start_method", "popen") != "popen":
            return False
    elif strategy not in SCRIPT_STRATEGIES:
        return False
    # processes created from outside (torchrun, srun, SLURM tasks) are not re-launched
    outside = {"LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & set(os.environ)
    if outside or int(os.environ.get("SLURM_NTASKS") or 1) > 1:
        return False
    many = len(devices) if isinstance(devices, list) else 2 if devices in (-1, "auto") else devices
    return isinstance(many, int) and many > 1


def _no_cuda(key: str, value: Any, instead: str) -> list[Problem]:
    import torch

    return [] if torch.cuda.is_available() else [
        _bad(key, value, f"no CUDA GPU is visible to this process ({instead})")]


def _load(key: str, path: Path, out: list[Problem], bundle: bool = False) -> Any:
    """The dictionary in ``path`` (a WarpLCA bundle's with ``bundle``); None, with a problem, if unread."""
    from warplca.bundle import WarpLCA
    from warplca.lca.dictionary import FORMAT, ConvDictionary
    from warplca.serialization import load_checked

    try:
        return WarpLCA.load(path).dictionary if bundle else ConvDictionary.from_payload(
            load_checked(path, FORMAT))
    except FileNotFoundError:
        out.append(_bad(key, path, "no such file"))
    except (ValueError, KeyError, TypeError) as exc:
        out.append(_bad(key, path, str(exc).replace(f"{path}: ", "")))
    return None


def _check_tau(cfg: DictConfig, dictionary: Any, which: str) -> list[Problem]:
    """A numeric τ must exceed L/2, L = ‖Φ‖²_op of ``dictionary`` on the data's image size."""
    tau = _get(cfg, "lca.tau")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        return []
    size = _get(cfg, "data.crop_size") or _get(cfg, "data.image_size") or 32
    lip = dictionary.operator_norm(size, size)
    if tau > lip / 2:
        return []
    return [_bad("lca.tau", tau, f"unstable {which}: LCA needs τ > L/2 = {lip / 2:.4g} (L = ‖Φ‖²_op = "
                                 f"{lip:.4g} on {size}×{size} images); use tau=auto (τ = L) or a larger τ")]


def check_train(cfg: DictConfig, bad_keys: set[str]) -> list[Problem]:
    """The cross-group checks of a train config whose nodes have been checked (``bad_keys``: the keys
    already refused, whose values these checks skip)."""
    out: list[Problem] = []
    for key in ("trainer", "model.dictionary.trainer", "model.warp.trainer", "model.classify.trainer"):
        accelerator = _get(cfg, f"{key}.accelerator")
        if accelerator in ("gpu", "cuda"):
            out += _no_cuda(f"{key}.accelerator", accelerator, "use trainer=cpu or trainer=ddp_cpu")
    strategy, devices = _get(cfg, "trainer.strategy"), _get(cfg, "trainer.devices")
    if multirun() and _relaunches_script(strategy, devices):
        out.append(_bad("trainer.strategy", strategy if isinstance(strategy, str) else "ddp",
                        "re-launches the script once per rank, and inside a Hydra multirun (-m) with "
                        "the basic launcher every rank would start its own sweep; use trainer=ddp_cpu "
                        "(ddp_spawn) or trainer.strategy=ddp_spawn, launch one process per job "
                        "(hydra/launcher=slurm), or run the jobs one by one"))
    if {"lca.tau", "data.crop_size", "data.image_size"} & bad_keys:
        return out
    # the dictionary LCA will code with: a given file, else the resumed run's
    n_before, dictionary, source = len(out), None, ""
    for key, bundle in (("dictionary_path", False), ("warp_path", True)):
        given = _get(cfg, key)
        loaded = _load(key, Path(given).expanduser(), out, bundle) if given else None
        if loaded is not None and dictionary is None:
            dictionary, source = loaded, f"{key}={given}"
    run_dir = _get(cfg, "paths.output_dir") if dictionary is None and not _get(cfg, "force") else None
    if isinstance(run_dir, str) and (Path(run_dir) / "dictionary.pt").is_file():
        source = f"the run's {Path(run_dir) / 'dictionary.pt'}"
        dictionary = _load("run_dir", Path(run_dir) / "dictionary.pt", out)
    if dictionary is not None:
        channels = data_channels(cfg)
        if channels is not None and channels != dictionary.in_channels:
            name = str(_get(cfg, "data._target_")).rsplit(".", 1)[-1]
            out.append(("data", f"data: {name} yields {channels}-channel images but {source} has "
                                f"{dictionary.in_channels}-channel atoms (use matching data, e.g. "
                                "data.grayscale=true / data.rgb=true, or another dictionary)"))
        return out + _check_tau(cfg, dictionary, f"for {source}")
    d = _get(cfg, "dictionary")
    if len(out) == n_before and not (_get(cfg, "dictionary_path") or _get(cfg, "warp_path")) and \
            isinstance(d, dict) and not any(k.startswith("dictionary.") for k in bad_keys):
        # learning only makes atoms more correlated: a τ unstable for the initial one stays unstable
        from hydra.utils import instantiate

        initial = instantiate({**d, "in_channels": data_channels(cfg) or 3})
        out += _check_tau(cfg, initial, "already for the initial dictionary")
    return out


def check_eval(cfg: DictConfig) -> list[Problem]:
    """The run directory, bundle (it loads) or sweep directory an evaluate config names exists, and a
    CUDA device it asks for is visible."""
    out: list[Problem] = []
    if not (_get(cfg, "run_dir") or _get(cfg, "bundle") or _get(cfg, "sweep_dir")):
        out.append(("run_dir", "run_dir: is required: evaluate.py run_dir=<training run directory> "
                               "(or bundle=<warp_lca.pt>, or sweep_dir=<multirun directory> for a sweep "
                               "summary)"))
    for key, is_dir in (("run_dir", True), ("sweep_dir", True), ("bundle", False)):
        given = _get(cfg, key)
        path = Path(given).expanduser() if given else None
        if path is not None and not (path.is_dir() if is_dir else path.is_file()):
            out.append(_bad(key, given, f"no such {'directory' if is_dir else 'file'}"))
        elif path is not None and not is_dir:
            _load(key, path, out, bundle=True)
    device = _get(cfg, "device")
    if device == "cuda" or str(device).startswith("cuda:"):
        out += _no_cuda("device", device, "use device=auto or cpu")
    return out
