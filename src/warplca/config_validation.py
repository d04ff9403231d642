"""Validate a composed train or evaluate config before anything runs, reporting every problem at once.

A run that dies after twenty minutes of dictionary learning because ``loss.name=laplacain`` is a typo
wastes the twenty minutes; so does fixing one problem per attempt. :func:`validate_train_config` and
:func:`validate_eval_config` walk every config group (types, ranges, known names, keys the target
classes do not take, cross-group facts such as a numeric τ against a known dictionary or the data's
channel count against a given dictionary/bundle) and raise one :class:`ConfigError` listing all of
them, each with its key::

    ConfigError: 3 problems:
      lca.lam=-1: must be a finite number ≥ 0 (the threshold λ)
      dictionary.kernel_size=8: must be odd (atoms are centred on their code position)
      trainer.max_epochs=0: must be an integer ≥ 1 (or -1 / null)

Problems are written ``key=value: rule`` (``key: rule`` for a missing or structural problem), so the
fix is the override on the left. A problem that is a missing file makes the error a
:class:`ConfigFileError` (also a ``FileNotFoundError``). The checks only read files (artifacts named
by ``dictionary_path``/``warp_path``/``run_dir``); nothing is instantiated but small dictionaries.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ConfigError",
    "ConfigFileError",
    "check_eval_config",
    "check_train_config",
    "validate_eval_config",
    "validate_train_config",
]

_MISSING = object()

#: Lightning precision flags (``trainer.precision``)
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "16-mixed", "bf16-true",
              "bf16-mixed", "transformer-engine", "transformer-engine-float16")
#: ``trainer.accelerator`` names besides Lightning's registry
ACCELERATOR_ALIASES = ("auto", "gpu")
#: strategies that re-launch the script once per rank (``trainer.strategy``)
SCRIPT_STRATEGIES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")
#: config nodes a misplaced key is looked up in, to say where it belongs
HOME_NODES = ("lca", "loss", "predictor", "dictionary", "norm", "data", "targets", "study",
              "model.dictionary", "model.warp", "model.classify", "trainer")


class ConfigError(ValueError):
    """The config has problems; ``problems`` lists ``(key, message)`` pairs, all of them."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"  {msg}" for _, msg in self.problems]
        super().__init__(f"{n} problem{'s' if n != 1 else ''}:\n" + "\n".join(lines))


class ConfigFileError(ConfigError, FileNotFoundError):
    """A :class:`ConfigError` in which at least one problem is a missing file."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


# -------------------------------------------------------------------------------------------------
# the checker: typed getters that record problems instead of raising
# -------------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class _Checker:
    """Collects ``(key, message)`` problems while reading values from a config."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.problems: list[tuple[str, str]] = []
        self.missing_files = False

    # -- recording ------------------------------------------------------------------------------
    def bad(self, key: str, value: Any, rule: str) -> None:
        self.problems.append((key, f"{key}={_show(value)}: {rule}"))

    def note(self, key: str, message: str) -> None:
        self.problems.append((key, f"{key}: {message}"))

    # -- reading --------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The resolved value at ``key`` (``default`` when absent); a resolution error is a problem."""
        try:
            value = OmegaConf.select(self.cfg, key, default=_MISSING, throw_on_resolution_failure=True)
        except Exception as exc:  # interpolation to a missing key, a failing resolver, …
            self.note(key, f"cannot be resolved: {exc}".splitlines()[0])
            return _MISSING
        return default if value is _MISSING else value

    def has(self, key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        node = self.cfg if not parent else OmegaConf.select(self.cfg, parent, default=None,
                                                             throw_on_resolution_failure=False)
        return isinstance(node, DictConfig) and leaf in node

    def node(self, key: str) -> DictConfig | None:
        value = self.get(key)
        return value if isinstance(value, DictConfig) else None

    # -- typed checks (each returns the value when valid, else None) ----------------------------
    def integer(self, key: str, minimum: int | None = None, *, optional: bool = False,
                allow: Iterable[Any] = (), why: str = "") -> int | None:
        if not self.has(key):
            return None
        v = self.get(key)
        if v is _MISSING or (v is None and optional) or v in tuple(allow):
            return None
        if not _is_int(v) or (minimum is not None and v < minimum):
            extra = [_show(a) for a in allow] + (["null"] if optional else [])
            rule = "must be an integer" + (f" ≥ {minimum}" if minimum is not None else "")
            rule += f" (or {' / '.join(extra)})" if extra else ""
            self.bad(key, v, rule + (f" ({why})" if why else ""))
            return None
        return int(v)

    def number(self, key: str, minimum: float | None = None, *, strict: bool = False,
               maximum: float | None = None, max_strict: bool = False, optional: bool = False,
               why: str = "") -> float | None:
        if not self.has(key):
            return None
        v = self.get(key)
        if v is _MISSING or (v is None and optional):
            return None
        ok = _is_number(v)
        if ok and minimum is not None:
            ok = v > minimum if strict else v >= minimum
        if ok and maximum is not None:
            ok = v < maximum if max_strict else v <= maximum
        if not ok:
            parts = []
            if minimum is not None:
                parts.append(f"{'>' if strict else '≥'} {minimum:g}")
            if maximum is not None:
                parts.append(f"{'<' if max_strict else '≤'} {maximum:g}")
            rule = "must be a finite number" + (" " + " and ".join(parts) if parts else "")
            rule += " (or null)" if optional else ""
            self.bad(key, v, rule + (f" ({why})" if why else ""))
            return None
        return float(v)

    def boolean(self, key: str, *, optional: bool = False) -> None:
        if not self.has(key):
            return
        v = self.get(key)
        if v is _MISSING or (v is None and optional):
            return
        if not isinstance(v, bool):
            self.bad(key, v, "must be true or false")

    def choice(self, key: str, options: Iterable[Any], *, optional: bool = False, what: str = "") -> Any:
        if not self.has(key):
            return None
        v = self.get(key)
        if v is _MISSING or (v is None and optional):
            return None
        opts = list(options)
        if v not in opts:
            known = ", ".join(_show(o) for o in opts)
            tail = " (or null)" if optional else ""
            self.bad(key, v, f"unknown {what or 'value'}; known: {known}{tail}")
            return None
        return v

    def odd(self, key: str, *, optional: bool = False, why: str = "") -> int | None:
        v = self.integer(key, 1, optional=optional)
        if v is not None and v % 2 == 0:
            self.bad(key, v, "must be odd" + (f" ({why})" if why else ""))
            return None
        return v

    def mapping(self, key: str, *, optional: bool = True) -> DictConfig | None:
        if not self.has(key):
            return None
        v = self.get(key)
        if v is _MISSING or (v is None and optional):
            return None
        if not isinstance(v, DictConfig):
            self.bad(key, v, "must be a mapping")
            return None
        return v

    def sequence(self, key: str, *, optional: bool = False) -> list[Any] | None:
        if not self.has(key):
            return None
        v = self.get(key)
        if v is _MISSING or (v is None and optional):
            return None
        if not isinstance(v, (ListConfig, list, tuple)):
            self.bad(key, v, "must be a list, e.g. [a,b]")
            return None
        return list(v)

    def keys(self, key: str, allowed: Iterable[str], what: str) -> None:
        node = self.node(key)
        if node is None:
            return
        unknown = sorted(str(k) for k in node if str(k) not in set(allowed))
        if unknown:
            self.note(key, f"unknown {what} config keys {unknown}; known: {sorted(set(allowed))}")

    def suggestion(self, key: str, leaf: str, allowed: Iterable[str]) -> str:
        """Where an unknown key ``<key>.<leaf>`` may belong: a close known key of ``key`` (a typo), else
        the other config nodes that have a key of that name (a misplaced key); "" when neither."""
        close = difflib.get_close_matches(leaf, sorted(set(allowed)), n=1, cutoff=0.75)
        if close:
            return f"; did you mean {key}.{close[0]}?"
        homes = []
        for home in HOME_NODES:
            if home == key:
                continue
            node = OmegaConf.select(self.cfg, home, default=None, throw_on_resolution_failure=False)
            if isinstance(node, DictConfig) and leaf in node:
                homes.append(f"{home}.{leaf}")
        return f"; it belongs to {' or '.join(homes)}" if homes else ""

    def yaml_keys(self, key: str, defaults: Mapping[str, Any], free: Iterable[str] = ()) -> None:
        """Refuse, one problem per key, the keys of the node ``key`` (and of its sub-mappings) that its
        YAML defaults ``defaults`` do not have; ``free`` names sub-mappings whose keys are open."""
        node = self.node(key)
        if node is None:
            return
        free = tuple(free)
        for k in node:
            k = str(k)
            sub = f"{key}.{k}"
            if k not in defaults:
                self.note(sub, f"unknown key in {key}; known: {sorted(defaults)}"
                               + self.suggestion(key, k, defaults))
            elif isinstance(defaults[k], Mapping) and sub not in free:
                self.yaml_keys(sub, defaults[k], free)

    def target_keys(self, key: str, provided: Iterable[str] = (), extra: Iterable[str] = (),
                    base: type | None = None,
                    hints: Mapping[str, str] | None = None) -> type | Callable[..., Any] | None:
        """Import ``<key>._target_`` and refuse keys its signature does not take (minus ``provided``,
        which the code passes itself, plus ``extra`` keys the stage reads). ``hints`` says, per provided
        key, where it is configured instead."""
        node = self.node(key)
        if node is None or "_target_" not in node:
            return None
        target = node.get("_target_")
        obj = _locate(str(target))
        if obj is None:
            self.bad(f"{key}._target_", target,
                     "cannot be imported (check the spelling and installed extras)")
            return None
        if base is not None and not (inspect.isclass(obj) and issubclass(obj, base)):
            self.bad(f"{key}._target_", target, f"must be a {base.__name__} subclass")
            return None
        params = _params(obj)
        if params is None:
            return obj
        names, var_kw = params
        if var_kw:
            return obj
        allowed = (names | set(extra) | {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
        taken_by_code = set(provided)
        hints = dict(hints or {})
        for k in node:
            k = str(k)
            if k in hints:
                self.bad(f"{key}.{k}", node.get(k), f"does not belong under {key}: {hints[k]}")
            elif k in taken_by_code:
                self.note(f"{key}.{k}", "is set by the pipeline itself; remove it from the config")
            elif k not in allowed:
                known = sorted((names | set(extra)) - taken_by_code)
                self.note(f"{key}.{k}", f"unknown key for {_name(obj)}; known: {known}"
                                        + self.suggestion(key, k, known))
        return obj


@cache
def _locate(path: str) -> Any:
    from hydra.utils import get_method

    try:
        return get_method(path)
    except Exception:
        return None


def _params(obj: Any) -> tuple[set[str], bool] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _name(obj: Any) -> str:
    return getattr(obj, "__name__", str(obj))


# -------------------------------------------------------------------------------------------------
# groups
# -------------------------------------------------------------------------------------------------


def _check_data(c: _Checker, key: str = "data") -> None:
    import pytorch_lightning as pl

    node = c.node(key)
    if node is None:
        if c.has(key) and c.get(key) not in (None, _MISSING):
            c.bad(key, c.get(key), "must be a datamodule config (choose one with data=<name>)")
        return
    c.target_keys(key, base=pl.LightningDataModule)
    c.integer(f"{key}.batch_size", 1, why="images per process; the global batch is × devices × num_nodes")
    c.integer(f"{key}.num_workers", 0)
    c.integer(f"{key}.crop_size", 1, optional=True)
    c.integer(f"{key}.image_size", 1, optional=True)
    for n in ("n_train", "n_val", "n_test"):
        c.integer(f"{key}.{n}", 1)
    c.integer(f"{key}.seed", 0)
    c.integer(f"{key}.split_seed", 0)
    c.number(f"{key}.scale", 0, strict=True)
    c.number(f"{key}.min_std", 0)
    c.number(f"{key}.val_fraction", 0, strict=True, maximum=1, max_strict=True)
    for b in ("grayscale", "rgb", "pin_memory", "download"):
        c.boolean(f"{key}.{b}")
    if c.get(f"{key}.grayscale") is True and c.get(f"{key}.rgb") is True:
        c.note(f"{key}.rgb", "rgb=true and grayscale=true contradict each other; choose one")


def _check_norm(c: _Checker) -> None:
    from warplca.data.normalization import KINDS

    if c.node("norm") is None:
        if c.has("norm") and c.get("norm") not in (None, _MISSING):
            c.bad("norm", c.get("norm"), f"must be a normalisation config (norm=<{'|'.join(KINDS)}>)")
        return
    c.keys("norm", ("kind", "scale", "lowpass_lambda", "lowpass_pad", "eps"), "norm")
    c.choice("norm.kind", KINDS, what="normalisation")
    c.number("norm.scale", 0, strict=True, optional=True)
    c.number("norm.lowpass_lambda", 0, strict=True, optional=True)
    c.integer("norm.lowpass_pad", 0, optional=True)
    c.number("norm.eps", 0, strict=True, optional=True)


def data_channels(cfg: DictConfig, key: str = "data") -> int | None:
    """The channel count the data config yields, from its class and flags (nothing is loaded)."""
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    cls = _locate(str(node.get("_target_")))
    native = getattr(cls, "native_channels", None)
    if not isinstance(native, int):
        return None
    if node.get("grayscale", False) is True:
        return 1
    if node.get("rgb", False) is True:
        return 3
    return native


def _image_size(cfg: DictConfig) -> tuple[int, int]:
    for key in ("data.crop_size", "data.image_size"):
        v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if _is_int(v) and v > 0:
            return v, v
    return 32, 32


def _check_dictionary(c: _Checker) -> None:
    from warplca.lca.dictionary import PADDING_MODES, ConvDictionary

    if c.node("dictionary") is None:
        return
    c.target_keys("dictionary", provided=("in_channels",), base=ConvDictionary)
    c.integer("dictionary.n_atoms", 1)
    c.odd("dictionary.kernel_size", why="atoms are centred on their code position")
    c.integer("dictionary.stride", 1)
    c.choice("dictionary.padding_mode", PADDING_MODES, what="padding mode")
    c.integer("dictionary.seed", 0, optional=True)


def _check_lca(c: _Checker) -> None:
    from warplca.lca.thresholds import THRESHOLDS

    if c.node("lca") is None:
        return
    from warplca.lca.solver import LCA

    params = _params(LCA)
    known = sorted((params[0] if params else set()) - {"self", "dictionary"})
    c.keys("lca", known, "lca")
    threshold = c.choice("lca.threshold", THRESHOLDS, what="threshold")
    c.number("lca.lam", 0, why="the threshold λ")
    tau = c.get("lca.tau", "auto")
    if tau is not _MISSING and tau != "auto" and not (_is_number(tau) and tau > 0):
        c.bad("lca.tau", tau,
              "must be a number > 0 or 'auto' (τ = ‖Φ‖²_op, the largest step with energy descent)")
    c.integer("lca.iters", 0)
    c.boolean("lca.nonneg")
    if threshold == "cel0":
        c.number("lca.theta", 0, strict=True, maximum=1, max_strict=True, why="θ of the cel0 threshold")
    c.number("lca.tol", 0, strict=True, optional=True)
    c.integer("lca.check_every", 1)
    c.choice("lca.backend", ("polyphase", "direct"), what="backend")
    c.boolean("lca.compile")


def _check_trainer(c: _Checker, key: str, *, multirun: bool = False) -> None:
    import pytorch_lightning as pl

    node = c.node(key)
    if node is None:
        return
    names = (_params(pl.Trainer) or (set(), False))[0]
    c.keys(key, names | {"_target_"}, "Trainer")
    accel = c.get(f"{key}.accelerator")
    if isinstance(accel, str):
        from pytorch_lightning.accelerators import AcceleratorRegistry

        known = sorted(set(AcceleratorRegistry.available_accelerators()) | set(ACCELERATOR_ALIASES))
        if accel not in known:
            c.bad(f"{key}.accelerator", accel, f"unknown accelerator; known: {', '.join(known)}")
        elif accel in ("gpu", "cuda"):
            _check_cuda(c, key)
    devices = c.get(f"{key}.devices")
    if devices not in (None, _MISSING, "auto", -1) and not (
            (_is_int(devices) and devices >= 1)
            or (isinstance(devices, (ListConfig, list)) and all(_is_int(d) and d >= 0 for d in devices))
            or (isinstance(devices, str)
                and all(p.strip().isdigit() for p in devices.split(",") if p.strip()))):
        c.bad(f"{key}.devices", devices, "must be an integer ≥ 1, -1 (all), 'auto' or a list of device ids")
    c.integer(f"{key}.num_nodes", 1)
    prec = c.get(f"{key}.precision")
    if prec not in (None, _MISSING) and str(prec) not in PRECISIONS:
        c.bad(f"{key}.precision", prec, f"unknown precision; known: {', '.join(PRECISIONS)}")
    strategy = c.get(f"{key}.strategy")
    if isinstance(strategy, str):
        from pytorch_lightning.strategies import StrategyRegistry

        known = sorted(set(StrategyRegistry.available_strategies()) | {"auto"})
        if strategy not in known:
            c.bad(f"{key}.strategy", strategy, "unknown strategy; e.g. auto, ddp, ddp_spawn, fsdp")
    elif isinstance(strategy, DictConfig):
        c.target_keys(f"{key}.strategy")
    c.integer(f"{key}.max_epochs", 1, optional=True, allow=(-1,))
    c.integer(f"{key}.min_epochs", 0, optional=True)
    c.integer(f"{key}.max_steps", -1, optional=True)
    for lim in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "overfit_batches"):
        v = c.get(f"{key}.{lim}") if c.has(f"{key}.{lim}") else None
        if v is None or v is _MISSING:
            continue
        if not ((_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)):
            c.bad(f"{key}.{lim}", v, "must be an integer ≥ 0 (batches) or a fraction in [0, 1]")
    c.integer(f"{key}.check_val_every_n_epoch", 1, optional=True)
    c.integer(f"{key}.log_every_n_steps", 1, optional=True)
    c.integer(f"{key}.num_sanity_val_steps", -1, optional=True)
    c.integer(f"{key}.accumulate_grad_batches", 1, optional=True)
    c.number(f"{key}.gradient_clip_val", 0, optional=True)
    fdr = c.get(f"{key}.fast_dev_run") if c.has(f"{key}.fast_dev_run") else None
    if fdr not in (None, _MISSING) and not (isinstance(fdr, bool) or (_is_int(fdr) and fdr >= 0)):
        c.bad(f"{key}.fast_dev_run", fdr, "must be true/false or an integer ≥ 0 (batches)")
    for b in ("deterministic", "enable_progress_bar", "enable_checkpointing", "enable_model_summary",
              "sync_batchnorm", "benchmark", "inference_mode", "use_distributed_sampler", "detect_anomaly"):
        v = c.get(f"{key}.{b}") if c.has(f"{key}.{b}") else None
        warn_ok = b == "deterministic" and v == "warn"
        if v not in (None, _MISSING) and not isinstance(v, bool) and not warn_ok:
            c.bad(f"{key}.{b}", v, "must be true or false" + (" (or 'warn')" if b == "deterministic" else ""))
    if multirun and _relaunches_script(strategy, c.get(f"{key}.devices"), c.get(f"{key}.num_nodes", 1)):
        c.bad(f"{key}.strategy", strategy if isinstance(strategy, str) else "ddp",
              "re-launches the script once per rank, and inside a Hydra multirun (-m) with the basic "
              "launcher every rank would start its own sweep; use trainer=ddp_cpu (ddp_spawn) or "
              "trainer.strategy=ddp_spawn, launch one process per job (hydra/launcher=slurm), or run the "
              "jobs one by one")


def _check_cuda(c: _Checker, key: str) -> None:
    import torch

    if not torch.cuda.is_available():
        c.bad(f"{key}.accelerator", c.get(f"{key}.accelerator"),
              "no CUDA GPU is visible to this process (use trainer=cpu or trainer=ddp_cpu)")
        return
    devices = c.get(f"{key}.devices")
    count = torch.cuda.device_count()
    if _is_int(devices) and devices > count:
        c.bad(f"{key}.devices", devices, f"asks for more GPUs than the {count} visible to this process")


def _relaunches_script(strategy: Any, devices: Any, num_nodes: Any) -> bool:
    """Whether this strategy makes Lightning re-run ``sys.argv`` per rank (``strategy=ddp`` on one node)."""
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        if not target.endswith("DDPStrategy"):
            return False
        if strategy.get("start_method", "popen") != "popen":
            return False
    elif strategy not in SCRIPT_STRATEGIES:
        return False
    # processes created from outside (torchrun, srun, SLURM tasks) are not re-launched
    if any(v in os.environ for v in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")):
        return False
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return False
    many = devices in (-1, "auto") or (_is_int(devices) and devices > 1) or (
        isinstance(devices, (ListConfig, list)) and len(devices) > 1)
    return bool(many)


def _check_group_of_targets(c: _Checker, key: str, what: str) -> None:
    """``logger`` / ``callbacks``: a mapping name -> null or {_target_: …}."""
    if not c.has(key):
        return
    group = c.get(key)
    if group is None or group is _MISSING:
        return
    if not isinstance(group, DictConfig):
        c.bad(key, group, f"must be a mapping of name -> {{_target_: ...}} ({what})")
        return
    for name, conf in group.items():
        sub = f"{key}.{name}"
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            c.bad(sub, conf, "must be a config with a _target_ (or null to drop it)")
            continue
        c.target_keys(sub)


def _check_model_dictionary(c: _Checker) -> None:
    key = "model.dictionary"
    if c.node(key) is None:
        return
    c.target_keys(key, provided=("dictionary", "lca_settings", "normalization"), extra=("trainer",))
    c.number(f"{key}.lr", 0, strict=True)
    c.integer(f"{key}.iters", 1, why="LCA steps per batch")
    opt = c.get(f"{key}.optimizer")
    if isinstance(opt, str) and opt.lower() not in ("adam", "sgd"):
        c.bad(f"{key}.optimizer", opt,
              "unknown optimizer; known: adam, sgd (or a `_partial_: true` torch.optim config)")
    c.integer(f"{key}.log_images_every_n_epochs", 0)
    c.integer(f"{key}.n_log_images", 0)
    c.number(f"{key}.coherence_weight", 0, why="β of the coherence penalty")
    c.number(f"{key}.coherence_target", 0, why="the ‖Φ‖²_op below which the penalty is zero")
    c.integer(f"{key}.resample_every", 0, why="training steps between dead-atom checks (0: never)")
    for name in ("resample_fraction", "resample_until", "min_lr_ratio"):
        c.number(f"{key}.{name}", 0, maximum=1)
    c.choice(f"{key}.lr_schedule", ("cosine", "constant"), what="learning-rate schedule")
    _check_trainer(c, f"{key}.trainer")


def _check_model_warp(c: _Checker) -> None:
    key = "model.warp"
    if c.node(key) is None:
        return
    from warplca.tasks.predictor_fit import DATA_KEYS, PIPELINE_KEYS

    c.target_keys(key, provided=PIPELINE_KEYS, extra=DATA_KEYS, hints=PIPELINE_KEYS)
    c.number(f"{key}.lr", 0, strict=True)
    c.number(f"{key}.weight_decay", 0)
    c.choice(f"{key}.scheduler", ("cosine", "none"), optional=True, what="scheduler")
    iters = c.sequence(f"{key}.eval_iters")
    if iters is not None and (not iters or not all(_is_int(k) and k >= 0 for k in iters)):
        c.bad(f"{key}.eval_iters", iters, "must be a non-empty list of integers ≥ 0 (LCA budgets)")
    c.integer(f"{key}.lca_eval_every_n_epochs", 1)
    c.integer(f"{key}.epochs", 1)
    c.integer(f"{key}.batch_size", 1, why="per process; the global batch is × devices × num_nodes")
    c.integer(f"{key}.num_workers", 0)
    _check_trainer(c, f"{key}.trainer")


def _check_model_classify(c: _Checker) -> None:
    key = "model.classify"
    if c.node(key) is None:
        return
    from warplca.data.corruptions import CORRUPTIONS
    from warplca.frontends import FRONTENDS
    from warplca.models.classifiers import BACKBONES
    from warplca.tasks.stage_classify import STAGE_KEYS

    c.target_keys(key, provided=("frontend", "num_classes", "image_size", "conditions"), extra=STAGE_KEYS)
    backbone = c.get(f"{key}.backbone")
    if isinstance(backbone, str):
        c.choice(f"{key}.backbone", sorted(BACKBONES), what="backbone")
    c.number(f"{key}.lr", 0, strict=True)
    c.number(f"{key}.weight_decay", 0)
    c.choice(f"{key}.scheduler", ("cosine", "none"), what="scheduler")
    c.number(f"{key}.label_smoothing", 0, maximum=1, max_strict=True)
    fronts = c.sequence(f"{key}.frontends")
    if fronts is not None and (not fronts or any(f not in FRONTENDS for f in fronts)):
        c.bad(f"{key}.frontends", fronts, f"must be a non-empty subset of {sorted(FRONTENDS)}")
    c.integer(f"{key}.lca_iters_cold", 1)
    c.integer(f"{key}.lca_iters_warm", 0)
    corr = c.mapping(f"{key}.corruptions")
    if corr is not None:
        for name, levels in corr.items():
            sub = f"{key}.corruptions.{name}"
            if name not in CORRUPTIONS:
                c.note(sub, f"unknown corruption; known: {sorted(CORRUPTIONS)}")
            elif not isinstance(levels, ListConfig) or not all(_is_number(v) and v >= 0 for v in levels):
                c.bad(sub, levels, "must be a list of levels ≥ 0")
    c.integer(f"{key}.corruption_seed", 0)
    c.choice(f"{key}.cache_features", ("auto", True, False), what="cache_features setting")
    c.choice(f"{key}.cache_dtype", ("float32", "float16", "bfloat16"), what="dtype")
    c.integer(f"{key}.batch_size", 1, optional=True)
    c.integer(f"{key}.feature_batch_size", 1)
    main = c.get(f"{key}.main_frontend")
    if main not in (None, _MISSING) and fronts is not None and main not in fronts:
        c.bad(f"{key}.main_frontend", main,
              f"must be one of model.classify.frontends {list(fronts)} (or null)")
    c.integer(f"{key}.epochs", 1)
    _check_trainer(c, f"{key}.trainer")


def _check_predictor(c: _Checker) -> None:
    if c.node("predictor") is None:
        return
    from warplca.models.warp_cnn import ACTIVATIONS, DRIVE_MODES

    c.target_keys("predictor", provided=("in_channels", "n_atoms", "stride"))
    c.integer("predictor.width", 1)
    c.integer("predictor.depth", 1)
    c.odd("predictor.kernel_size", why="same padding keeps the code grid")
    c.odd("predictor.stem_kernel_size", optional=True, why="same padding keeps the code grid")
    c.boolean("predictor.use_drive")
    c.choice("predictor.drive_mode", DRIVE_MODES, what="drive mode")
    c.choice("predictor.activation", sorted(ACTIVATIONS), what="activation")
    if c.get("predictor.drive_scale") != "auto":
        c.number("predictor.drive_scale", 0, strict=True, optional=True, why="the drive's factor (or auto)")


def _check_loss(c: _Checker) -> None:
    if c.node("loss") is None:
        return
    from warplca.losses import LOSSES

    c.keys("loss", ("name", "gamma"), "loss")
    name = c.choice("loss.name", LOSSES, what="loss")
    c.number("loss.gamma", 0, strict=True, optional=name != "laplacian" or c.get("loss.gamma") is None,
             why="the Laplacian scale γ")


def _check_targets(c: _Checker) -> None:
    if c.node("targets") is None:
        return
    from warplca.config_defaults import primary_defaults
    from warplca.data.datamodule import SPLITS

    c.yaml_keys("targets", primary_defaults("targets"))
    c.integer("targets.iters", 1, why="target_iters: cold-LCA steps per target")
    splits = c.sequence("targets.splits")
    if splits is not None and (any(s not in SPLITS for s in splits) or "train" not in splits):
        c.bad("targets.splits", splits, f"must be a subset of {list(SPLITS)} that includes train")
    c.integer("targets.batch_size", 1)
    c.integer("targets.chunk_size", 1)
    c.integer("targets.limit", 1, optional=True)
    c.integer("targets.num_workers", 0)
    c.choice("targets.solver", ("cold", "continuation"), optional=True, what="target solver")
    c.mapping("targets.continuation")
    c.number("targets.continuation.start_factor", 1, why="the first stage's λ factor")
    c.integer("targets.continuation.stages", 1)
    c.number("targets.continuation.anneal_frac", 0, maximum=1)


def _check_study(c: _Checker) -> None:
    if c.node("study") is None:
        return
    from warplca.config_defaults import primary_defaults
    from warplca.data.datamodule import SPLITS
    from warplca.losses import LOSSES
    from warplca.tasks.predictor_fit import INPUTS

    c.yaml_keys("study", primary_defaults("study"))
    c.choice("study.split", SPLITS, what="split")
    c.integer("study.n_images", 1, optional=True)
    c.integer("study.iters", 1, optional=True)
    c.integer("study.batch_size", 1)
    for key, allowed in (("study.ablation.losses", LOSSES), ("study.ablation.inputs", INPUTS)):
        values = c.sequence(key)
        if values is not None and (not values or any(str(v) not in allowed for v in values)):
            c.bad(key, values, f"must be a non-empty list from {list(allowed)}")
    if c.node("study.ablation") is not None:
        c.integer("study.ablation.epochs", 1, optional=True)
    if c.node("study.learning_curve") is not None:
        for key in ("study.learning_curve.sizes", "study.learning_curve.epochs", "study.budgets"):
            values = c.sequence(key)
            if values is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                              for v in values):
                c.bad(key, values, "must be a list of positive integers")


def _check_eval_keys(c: _Checker) -> None:
    """The ``eval`` node (evaluate, and the report stage of a train config) has only keys the
    ``conf/eval`` options set (``eval.thresholds.runs`` is open: threshold name -> run)."""
    from warplca.config_defaults import option_defaults

    c.yaml_keys("eval", option_defaults("eval", "all"), free=("eval.thresholds.runs",))


# -------------------------------------------------------------------------------------------------
# artifacts named by the config: readable, the right kind, consistent with the data and τ
# -------------------------------------------------------------------------------------------------


def _load_dictionary(c: _Checker, key: str, path: Path) -> Any:
    from warplca.lca.dictionary import FORMAT, ConvDictionary
    from warplca.serialization import load_checked

    try:
        return ConvDictionary.from_payload(load_checked(path, FORMAT))
    except FileNotFoundError:
        c.missing_files = True
        c.bad(key, path, "no such file")
    except (ValueError, KeyError, TypeError) as exc:
        c.bad(key, path, str(exc).replace(f"{path}: ", ""))
    return None


def _load_bundle_dictionary(c: _Checker, key: str, path: Path) -> Any:
    from warplca.bundle import WarpLCA

    try:
        return WarpLCA.load(path).dictionary
    except FileNotFoundError:
        c.missing_files = True
        c.bad(key, path, "no such file")
    except (ValueError, KeyError, TypeError) as exc:
        c.bad(key, path, str(exc).replace(f"{path}: ", ""))
    return None


def _check_artifacts(c: _Checker) -> None:
    """Given dictionary/bundle files must load; their channels must match the data; numeric τ must be
    stable for the dictionary that will be coded with (the given one, or the resumed run's)."""
    dictionary, source = None, ""
    for key, loader in (("dictionary_path", _load_dictionary), ("warp_path", _load_bundle_dictionary)):
        given = c.get(key)
        if given in (None, "", _MISSING):
            continue
        if not isinstance(given, (str, os.PathLike)):
            c.bad(key, given, "must be a path")
            continue
        loaded = loader(c, key, Path(given).expanduser())
        if loaded is not None and dictionary is None:
            dictionary, source = loaded, f"{key}={given}"
    if dictionary is None and not c.get("force", False):
        out = c.get("paths.output_dir")
        if isinstance(out, str) and (Path(out) / "dictionary.pt").is_file():
            dictionary = _load_dictionary(c, "run_dir", Path(out) / "dictionary.pt")
            source = f"the run's {Path(out) / 'dictionary.pt'}"
    if dictionary is None:
        return
    channels = data_channels(c.cfg)
    if channels is not None and channels != dictionary.in_channels:
        target = _show(c.get("data._target_")).rsplit(".", 1)[-1]
        c.note("data", f"{target} yields {channels}-channel images but {source} has "
                       f"{dictionary.in_channels}-channel atoms (use matching data, e.g. "
                       f"data.grayscale=true / data.rgb=true, or another dictionary)")
    _check_tau_against(c, dictionary, source)


def _check_tau_against(c: _Checker, dictionary: Any, source: str) -> None:
    tau = c.get("lca.tau", "auto")
    if not _is_number(tau) or tau <= 0:
        return
    h, w = _image_size(c.cfg)
    lip = dictionary.operator_norm(h, w)
    if tau <= lip / 2:
        c.bad("lca.tau", tau, f"unstable for {source}: LCA needs τ > L/2 = {lip / 2:.4g} (L = ‖Φ‖²_op = "
                              f"{lip:.4g} on {h}×{w} images); use tau=auto (τ = L) or a larger τ")


def _check_tau_initial(c: _Checker) -> None:
    """Without a known dictionary, check a numeric τ against the (seeded) initial one: learning only
    makes atoms more correlated, so a τ unstable for it is unstable for the learned one too."""
    tau = c.get("lca.tau", "auto")
    if not _is_number(tau) or tau <= 0 or c.node("dictionary") is None:
        return
    if any(c.get(k) not in (None, "", _MISSING) for k in ("dictionary_path", "warp_path")):
        return
    from warplca.lca.dictionary import ConvDictionary

    d = c.node("dictionary")
    assert d is not None
    try:
        kwargs = {k: d.get(k) for k in ("n_atoms", "kernel_size", "stride", "padding_mode", "seed") if k in d}
        dictionary = ConvDictionary(in_channels=data_channels(c.cfg) or 3, **kwargs)
    except Exception:  # the geometry itself is reported by _check_dictionary
        return
    h, w = _image_size(c.cfg)
    lip = dictionary.operator_norm(h, w)
    if tau <= lip / 2:
        c.bad("lca.tau", tau, f"unstable already for the initial dictionary: LCA needs τ > L/2 = "
                              f"{lip / 2:.4g} (L = ‖Φ‖²_op = {lip:.4g} on {h}×{w} images); "
                              f"use tau=auto (τ = L)")


# -------------------------------------------------------------------------------------------------
# entry points
# -------------------------------------------------------------------------------------------------


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return False
        launcher = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
        return launcher.endswith("BasicLauncher") or not launcher
    except Exception:
        return False


def check_train_config(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every problem of a composed train config as ``(key, message)`` pairs (empty: valid)."""
    from warplca.tasks.stages import STAGE_ORDER

    c = _Checker(cfg)
    stages = c.get("stages")
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.strip("[]").split(",") if s.strip()]
    if stages not in (None, _MISSING):
        if not isinstance(stages, (ListConfig, list)):
            c.bad("stages", stages, "must be a list of stages, e.g. stages=[dictionary,targets]")
        else:
            unknown = [str(s) for s in stages if str(s) not in STAGE_ORDER]
            if unknown:
                c.bad("stages", stages, f"unknown stage(s) {unknown}; valid stages: {list(STAGE_ORDER)} "
                                        f"(e.g. stages=[dictionary,targets])")
    c.integer("seed", 0, optional=True)
    for b in ("force", "resume", "skip_nonfinite_batches", "print_metrics"):
        c.boolean(b)
    om = c.get("optimized_metric")
    if om not in (None, _MISSING) and not isinstance(om, str):
        c.bad("optimized_metric", om, "must be a metric name such as warp/val/state_r2 (or null)")
    _check_data(c)
    _check_norm(c)
    _check_dictionary(c)
    _check_lca(c)
    _check_model_dictionary(c)
    _check_model_warp(c)
    _check_model_classify(c)
    _check_predictor(c)
    _check_loss(c)
    _check_targets(c)
    _check_study(c)
    _check_eval_keys(c)
    _check_trainer(c, "trainer", multirun=_multirun())
    _check_group_of_targets(c, "logger", "loggers")
    _check_group_of_targets(c, "callbacks", "callbacks")
    n_before = len(c.problems)
    _check_artifacts(c)
    if len(c.problems) == n_before:
        _check_tau_initial(c)
    _dedupe(c)
    return c.problems


def check_eval_config(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every problem of a composed evaluate config as ``(key, message)`` pairs (empty: valid)."""
    from warplca.data.datamodule import SPLITS

    c = _Checker(cfg)
    run_dir, bundle, sweep = c.get("run_dir"), c.get("bundle"), c.get("sweep_dir")
    if all(v in (None, "", _MISSING) for v in (run_dir, bundle, sweep)):
        c.note("run_dir", "is required: evaluate.py run_dir=<training run directory> (or "
                          "bundle=<warp_lca.pt>, or sweep_dir=<multirun directory> for a sweep summary)")
    for key, kind in (("run_dir", "dir"), ("sweep_dir", "dir"), ("bundle", "file")):
        v = c.get(key)
        if v in (None, "", _MISSING):
            continue
        p = Path(str(v)).expanduser()
        if not (p.is_dir() if kind == "dir" else p.is_file()):
            c.missing_files = True
            c.bad(key, v, f"no such {'directory' if kind == 'dir' else 'file'}")
    if bundle not in (None, "", _MISSING) and Path(str(bundle)).expanduser().is_file():
        _load_bundle_dictionary(c, "bundle", Path(str(bundle)).expanduser())
    if not sweep:
        from warplca.evaluation.experiments import MODES

        _check_eval_keys(c)
        modes = c.sequence("eval.modes")
        if modes is not None and any(m not in MODES for m in modes):
            c.bad("eval.modes", modes,
                  f"unknown eval mode(s); choose from {list(MODES)} (eval=all runs each one)")
        c.choice("eval.split", SPLITS, what="split")
        c.integer("eval.n_images", 1, optional=True)
        c.integer("eval.batch_size", 1)
        c.integer("eval.iters", 1, optional=True, why="the reference budget T")
        budgets = c.sequence("eval.budgets")
        if budgets is not None and (not budgets or not all(_is_int(b) and b >= 1 for b in budgets)):
            c.bad("eval.budgets", budgets, "must be a non-empty list of integers ≥ 1")
        sig = c.sequence("eval.denoise.sigmas")
        if sig is not None and not all(_is_number(s) and 0 < s <= 1 for s in sig):
            c.bad("eval.denoise.sigmas", sig, "must be noise levels in (0, 1] (σ on the [0, 1] pixel scale)")
        c.integer("eval.ood.n_images", 1, optional=True)
    device = c.get("device")
    known_device = isinstance(device, str) and (
        device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()))
    if device not in (None, _MISSING) and not known_device:
        c.bad("device", device, "must be auto, cpu, cuda, cuda:<n> or mps")
    if device == "cuda" or (isinstance(device, str) and device.startswith("cuda:")):
        import torch

        if not torch.cuda.is_available():
            c.bad("device", device, "no CUDA GPU is visible to this process (use device=auto or cpu)")
    c.integer("seed", 0, optional=True)
    c.boolean("progress")
    if c.node("data") is not None:
        _check_data(c)
    _check_group_of_targets(c, "logger", "loggers")
    _dedupe(c)
    return c.problems


def _dedupe(c: _Checker) -> None:
    seen: set[str] = set()
    out = []
    for key, msg in c.problems:
        if msg not in seen:
            seen.add(msg)
            out.append((key, msg))
    c.problems = out


def _raise(problems: list[tuple[str, str]], missing_files: bool) -> None:
    if problems:
        raise (ConfigFileError if missing_files else ConfigError)(problems)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a train config (see the module doc)."""
    c = _Checker(cfg)
    c.problems = check_train_config(cfg)
    c.missing_files = any(msg.endswith(": no such file") for _, msg in c.problems)
    _raise(c.problems, c.missing_files)


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of an evaluate config."""
    problems = check_eval_config(cfg)
    missing = any(msg.endswith((": no such file", ": no such directory")) for _, msg in problems)
    _raise(problems, missing)


def describe(problems: Iterable[tuple[str, str]]) -> str:
    """The problems as the indented lines :class:`ConfigError` shows."""
    return "\n".join(f"  {m}" for _, m in problems)
