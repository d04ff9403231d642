"""Checks that need two config groups, a file or the machine, run once every group has been parsed: τ stable
for the dictionary LCA will code with, data channels matching a given dictionary, no script-relaunching DDP
inside a basic-launcher multirun, CUDA visible when asked for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from warplca.config_parsing import Parser, Settings, locate, show
from warplca.config_settings import TRAIN, TRAINER
from warplca.runtime import is_multirun

__all__ = ["SCRIPT_STRATEGIES", "check_eval", "check_train", "data_channels", "multirun"]

#: strategies that re-launch the script once per rank (``trainer.strategy``)
SCRIPT_STRATEGIES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")


def data_channels(cfg: DictConfig, key: str = "data") -> int | None:
    """The channel count the data config yields, from its class and flags (nothing is loaded)."""
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    native = getattr(locate(str(node.get("_target_"))), "native_channels", None)
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


def _no_cuda(p: Parser, key: str, value: Any, instead: str) -> None:
    import torch

    if not torch.cuda.is_available():
        p.bad(key, value, f"no CUDA GPU is visible to this process ({instead})")


def _load(p: Parser, key: str, path: Path, bundle: bool = False) -> Any:
    """The dictionary in ``path`` (a WarpLCA bundle's with ``bundle``); None, with a problem, if unread."""
    from warplca.bundle import WarpLCA
    from warplca.lca.dictionary import FORMAT, ConvDictionary
    from warplca.serialization import load_checked

    try:
        return WarpLCA.load(path).dictionary if bundle else ConvDictionary.from_payload(
            load_checked(path, FORMAT))
    except FileNotFoundError:
        p.bad(key, path, "no such file")
    except (ValueError, KeyError, TypeError) as exc:
        p.bad(key, path, str(exc).replace(f"{path}: ", ""))
    return None


def _check_tau(p: Parser, groups: Mapping[str, Settings | None], dictionary: Any, which: str) -> None:
    """A numeric τ must exceed L/2, L = ‖Φ‖²_op of ``dictionary`` on the data's image size."""
    tau, data = (groups.get("lca") or {}).get("tau"), groups.get("data") or {}
    if not isinstance(tau, (int, float)):
        return
    size = data.get("crop_size") or data.get("image_size") or 32
    lip = dictionary.operator_norm(size, size)
    if tau <= lip / 2:
        p.bad("lca.tau", tau, f"unstable {which}: LCA needs τ > L/2 = {lip / 2:.4g} (L = ‖Φ‖²_op = {lip:.4g} "
                              f"on {size}×{size} images); use tau=auto (τ = L) or a larger τ")


def check_train(p: Parser, cfg: DictConfig, groups: Mapping[str, Settings | None]) -> None:
    """The cross-group checks of a train config whose nodes parsed into ``groups`` (``""``: the top)."""
    run, d = groups.get("") or {}, groups.get("dictionary")
    for key, trainer in groups.items():
        if TRAIN[key] is TRAINER and trainer and trainer["accelerator"] in ("gpu", "cuda"):
            _no_cuda(p, f"{key}.accelerator", trainer["accelerator"], "use trainer=cpu or trainer=ddp_cpu")
    strategy, devices = ((groups.get("trainer") or {}).get(k) for k in ("strategy", "devices"))
    if multirun() and _relaunches_script(strategy, devices):
        p.bad("trainer.strategy", strategy if isinstance(strategy, str) else "ddp",
              "re-launches the script once per rank, and inside a Hydra multirun (-m) with the basic "
              "launcher every rank would start its own sweep; use trainer=ddp_cpu (ddp_spawn) or "
              "trainer.strategy=ddp_spawn, launch one process per job (hydra/launcher=slurm), or run the "
              "jobs one by one")
    # the dictionary LCA will code with: a given file, else the resumed run's
    n_before, dictionary, source = len(p.problems), None, ""
    for key, bundle in (("dictionary_path", False), ("warp_path", True)):
        loaded = _load(p, key, Path(run[key]).expanduser(), bundle) if run.get(key) else None
        if loaded is not None and dictionary is None:
            dictionary, source = loaded, f"{key}={run[key]}"
    out = p.value("paths.output_dir") if dictionary is None and not run.get("force") else None
    if isinstance(out, str) and (Path(out) / "dictionary.pt").is_file():
        source = f"the run's {Path(out) / 'dictionary.pt'}"
        dictionary = _load(p, "run_dir", Path(out) / "dictionary.pt")
    if dictionary is not None:
        channels = data_channels(cfg)
        if channels is not None and channels != dictionary.in_channels:
            p.note("data", f"{show(p.value('data._target_')).rsplit('.', 1)[-1]} yields {channels}-channel "
                           f"images but {source} has {dictionary.in_channels}-channel atoms (use matching "
                           f"data, e.g. data.grayscale=true / data.rgb=true, or another dictionary)")
        _check_tau(p, groups, dictionary, f"for {source}")
    elif (len(p.problems) == n_before and not (run.get("dictionary_path") or run.get("warp_path")) and d
          and None not in (d["n_atoms"], d["kernel_size"], d["stride"])):
        # learning only makes atoms more correlated: a τ unstable for the initial one stays unstable
        from warplca.lca.dictionary import ConvDictionary

        extra = {k: d[k] for k in ("padding_mode", "seed") if d[k] is not None}
        initial = ConvDictionary(d["n_atoms"], data_channels(cfg) or 3, d["kernel_size"], d["stride"],
                                 **extra)
        _check_tau(p, groups, initial, "already for the initial dictionary")


def check_eval(p: Parser, run: Settings) -> None:
    """The run directory, bundle (it loads) or sweep directory an evaluate config names exists, and a
    CUDA device it asks for is visible."""
    if not (run.get("run_dir") or run.get("bundle") or run.get("sweep_dir")):
        p.note("run_dir", "is required: evaluate.py run_dir=<training run directory> (or "
                          "bundle=<warp_lca.pt>, or sweep_dir=<multirun directory> for a sweep summary)")
    for key, is_dir in (("run_dir", True), ("sweep_dir", True), ("bundle", False)):
        path = Path(run[key]).expanduser() if run.get(key) else None
        if path is not None and not (path.is_dir() if is_dir else path.is_file()):
            p.bad(key, run[key], f"no such {'directory' if is_dir else 'file'}")
        elif path is not None and not is_dir:
            _load(p, key, path, bundle=True)
    device = run.get("device")
    if device == "cuda" or str(device).startswith("cuda:"):
        _no_cuda(p, "device", device, "use device=auto or cpu")
