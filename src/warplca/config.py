"""The Hydra edge of the settings declared in the code (:mod:`warplca.settings`).

:data:`TRAIN` says which declaration each node of a train config follows: the class of its ``_target_``
(minus the keys the pipeline passes itself) and the settings dataclasses of the stage that reads it.
:func:`register_bases` stores one base per declaration in Hydra's ConfigStore (``lca/LCA``,
``model/WarpRegression``, ``targets/TargetSettings``, …), so a YAML preset holds only what differs and a
run's saved config holds every setting. :func:`check_train_config` checks a composed config before any
work and lists every problem with its key path; the checks that need two groups, a file or the machine
are in :mod:`warplca.preflight`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from warplca.bundle import check_predictor_target
from warplca.data import DATAMODULES, Normalization
from warplca.evaluation.experiments import EvalRunSettings, eval_defaults, eval_problems
from warplca.lca import LCA, ConvDictionary
from warplca.losses import LossSettings
from warplca.models import WarpCNN
from warplca.modules import DictionaryLearning, NoisyClassification, WarpRegression
from warplca.settings import SettingsError, build, declared, defaults, path_of, problems, show
from warplca.tasks.context import RunSettings
from warplca.tasks.predictor_fit import PIPELINE_KEYS, WarpStageSettings
from warplca.tasks.stage_classify import ClassifyStageSettings
from warplca.tasks.stage_targets import TargetSettings
from warplca.tasks.study import StudySettings
from warplca.tasks.utils import register_resolvers

__all__ = ["TRAIN", "ConfigError", "ConfigFileError", "Node", "check_eval_config", "check_train_config",
           "compose_config", "default_config_dir", "node_problems", "register_bases", "validate_eval_config",
           "validate_train_config"]

Problem = tuple[str, str]
_META = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_ABSENT: Any = object()


@dataclass(frozen=True)
class Node:
    """A config node: the keys of ``target`` (the class of its ``_target_``; ``instantiable``: the node
    names its class) and of the ``stage`` dataclasses; ``provided`` keys are passed by the pipeline (the
    value says where they are configured instead), ``extra`` keys are read by other code."""

    target: Any = None
    stage: tuple[type, ...] = ()
    provided: Mapping[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    instantiable: bool = True
    base: type | None = None
    check_target: Callable[[str], str | None] | None = None

    def declaration(self, node: Mapping[str, Any]) -> tuple[Any, str | None]:
        """(the class the node instantiates, a problem text if its ``_target_`` is unusable)."""
        path = node.get("_target_") if self.instantiable else None
        if path is None:
            return self.target, None
        problem = self.check_target(str(path)) if self.check_target is not None else None
        if problem is not None:
            return None, problem
        obj = _locate(str(path))
        if obj is None:
            return None, "cannot be imported (check spelling and installed extras)"
        if self.base is not None and not (inspect.isclass(obj) and issubclass(obj, self.base)):
            return None, f"must be a {self.base.__name__} subclass"
        return obj, None

    def known(self, decl: Any) -> set[str]:
        keys = {k for s in self.stage for k in declared(s)} | set(self.extra) | set(self.provided)
        return keys | (set(declared(decl)) if decl is not None and _closed(decl) else set())


def _pipeline(*keys: str) -> dict[str, str]:
    return {k: "is set by the pipeline itself; remove it from the config" for k in keys}


@cache
def _locate(path: str) -> Any:
    from hydra.utils import get_method

    try:
        return get_method(path)
    except Exception:
        return None


def _closed(obj: Any) -> bool:
    """Whether ``obj``'s signature lists every key it takes (no ``**kwargs``)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind == p.VAR_KEYWORD for p in params)


def _trainer() -> Node:
    return Node(pl.Trainer, instantiable=False)


#: every node of a train config and its declaration (``""``: the top-level keys)
TRAIN: dict[str, Node] = {
    "": Node(stage=(RunSettings,), instantiable=False,
             extra=("data", "norm", "dictionary", "lca", "model", "predictor", "loss", "targets", "study",
                    "eval", "trainer", "logger", "callbacks", "paths", "hydra", "experiment",
                    "hparams_search", "debug")),
    "data": Node(DATAMODULES["natural"], base=pl.LightningDataModule),
    "norm": Node(Normalization, provided=_pipeline("mean"), instantiable=False),
    "dictionary": Node(ConvDictionary, provided=_pipeline("in_channels"), base=ConvDictionary),
    "lca": Node(LCA, provided=_pipeline("dictionary"), instantiable=False),
    "predictor": Node(WarpCNN, provided=_pipeline("in_channels", "n_atoms", "stride"), base=nn.Module,
                      check_target=check_predictor_target),
    "loss": Node(stage=(LossSettings,), instantiable=False),
    "targets": Node(stage=(TargetSettings,), instantiable=False),
    "study": Node(stage=(StudySettings,), instantiable=False),
    "model.dictionary": Node(DictionaryLearning, provided=_pipeline("dictionary", "lca_settings",
                                                                    "normalization"), extra=("trainer",)),
    "model.warp": Node(WarpRegression, stage=(WarpStageSettings,), extra=("trainer",),
                       provided={k: f"does not belong under model.warp: {v}"
                                 for k, v in PIPELINE_KEYS.items()}),
    "model.classify": Node(NoisyClassification, stage=(ClassifyStageSettings,), extra=("trainer",),
                           provided=_pipeline("frontend", "num_classes", "image_size", "conditions")),
}
TRAINERS = ("trainer", "model.dictionary.trainer", "model.warp.trainer", "model.classify.trainer")
INSTANCES = ("logger", "callbacks")


class ConfigError(ValueError):
    """The config has problems; ``problems`` lists ``(key, message)`` pairs, all of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = [f"  {m}" for _, m in self.problems]
        super().__init__(f"{len(lines)} problem{'s' if len(lines) != 1 else ''}:\n" + "\n".join(lines))


class ConfigFileError(ConfigError, FileNotFoundError):
    """A :class:`ConfigError` in which at least one problem is a missing file."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


def _values(cfg: DictConfig, key: str, out: list[Problem], skip: Iterable[str] = ()) -> dict[str, Any] | None:
    """The node at ``key`` with every value resolved to plain Python (None: absent or null; ``skip``: keys
    kept unresolved); a value that cannot be resolved is left out and recorded."""
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False) if key else cfg
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        out.append((key, f"{key}={show(node)}: must be a config node (a mapping)"))
        return None
    values: dict[str, Any] = {}
    for k in map(str, node):
        if k in skip:
            values[k] = None
            continue
        try:
            v = node[k]
            values[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) \
                else v
        except Exception as exc:  # an interpolation to a missing key, a failing resolver, …
            path = f"{key}.{k}" if key else k
            out.append((path, f"{path}: cannot be resolved: {str(exc).splitlines()[0]}"))
    return values


def _home(cfg: DictConfig, key: str, leaf: str) -> str:
    """Where a key named ``leaf`` found under ``key`` belongs (another node that declares it), or ''."""
    homes = []
    for other, spec in TRAIN.items():
        if other in (key, "") or other.startswith(f"{key}."):
            continue
        node = OmegaConf.select(cfg, other, default=None, throw_on_resolution_failure=False)
        decl = spec.declaration(node)[0] if isinstance(node, DictConfig) else spec.target
        if leaf in spec.known(decl) and leaf not in spec.provided:
            homes.append(f"{other}.{leaf}")
    return f"; it belongs to {' or '.join(homes)}" if homes else ""


def node_problems(cfg: DictConfig, key: str, spec: Node) -> list[Problem]:
    """Every problem of the node at ``key`` against its declaration ``spec``."""
    out: list[Problem] = []
    values = _values(cfg, key, out, skip=spec.extra)
    if values is None:
        return out
    prefix = f"{key}." if key else ""
    decl, bad_target = spec.declaration(values)
    if bad_target:
        return out + [(f"{prefix}_target_", f"{prefix}_target_={values['_target_']}: {bad_target}")]
    known = spec.known(decl)
    for k in values:
        if k in spec.provided:
            out.append((f"{prefix}{k}", f"{prefix}{k}={show(values[k])}: {spec.provided[k]}"))
        elif k not in known | _META and (decl is None or _closed(decl)):
            close = difflib.get_close_matches(k, sorted(known - set(spec.provided)), n=1, cutoff=0.75)
            hint = f"; did you mean {prefix}{close[0]}?" if close else _home(cfg, key, k)
            name = getattr(decl, "__name__", None) or (key or "the top level")
            out.append((f"{prefix}{k}", f"{prefix}{k}: unknown key for {name}; known: "
                                        f"{sorted(known - set(spec.provided))}{hint}"))
    if decl is not None:
        mine = {k: v for k, v in values.items() if k in declared(decl) and k not in spec.provided}
        out += problems(decl, mine, key)
    for stage in spec.stage:
        try:
            build(stage, {k: v for k, v in values.items() if k in declared(stage)}, key)
        except SettingsError as exc:
            out += exc.problems
    return out


def _instances(cfg: DictConfig, key: str) -> list[Problem]:
    """``logger`` / ``callbacks``: each entry null or a config whose ``_target_`` takes its keys."""
    out: list[Problem] = []
    for name, conf in (_values(cfg, key, out) or {}).items():
        if conf is not None and not (isinstance(conf, Mapping) and "_target_" in conf):
            out.append((f"{key}.{name}", f"{key}.{name}={show(conf)}: must be a config with a _target_ "
                                         "(or null to drop it)"))
        elif conf is not None:
            out += node_problems(OmegaConf.create({key: {name: conf}}), f"{key}.{name}", Node())
    return out


def check_train_config(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed train config as ``(key, message)`` pairs (empty: valid)."""
    from warplca import preflight

    out: list[Problem] = []
    for key, spec in TRAIN.items():
        out += node_problems(cfg, key, spec)
    trainer = _trainer()
    for key in TRAINERS:
        out += node_problems(cfg, key, trainer)
    for key in INSTANCES:
        out += _instances(cfg, key)
    out += check_eval_node(cfg)
    out += preflight.check_train(cfg, {k for k, _ in out})
    return list(dict.fromkeys(out))  # each problem once


def check_eval_node(cfg: DictConfig) -> list[Problem]:
    """The ``eval`` node (of an evaluate config; a train config's report stage reads it too)."""
    out: list[Problem] = []
    values = _values(cfg, "eval", out)
    return out + (eval_problems(values) if values is not None else [])


#: the top-level keys of an evaluate config
EVAL_RUN = Node(stage=(EvalRunSettings,), instantiable=False,
                extra=("eval", "data", "logger", "paths", "hydra"))


def check_eval_config(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed evaluate config as ``(key, message)`` pairs (empty: valid)."""
    from warplca import preflight

    out = node_problems(cfg, "", EVAL_RUN) + preflight.check_eval(cfg)
    if not cfg.get("sweep_dir"):  # a sweep summary reads no eval settings
        out += check_eval_node(cfg)
    out += node_problems(cfg, "data", TRAIN["data"]) + _instances(cfg, "logger")
    return list(dict.fromkeys(out))


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of an evaluate config."""
    raise_problems(check_eval_config(cfg))


def raise_problems(problems: list[Problem]) -> None:
    """Raise :class:`ConfigError` (:class:`ConfigFileError` when a file is missing) for ``problems``."""
    if problems:
        missing = any(m.endswith((": no such file", ": no such directory")) for _, m in problems)
        raise (ConfigFileError if missing else ConfigError)(problems)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a train config."""
    raise_problems(check_train_config(cfg))


def _base(spec: Node, decl: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    out = {"_target_": path_of(decl)} if spec.instantiable and decl is not None else {}
    if decl is not None:
        out.update(defaults(decl, skip=set(spec.provided) | set(skip)))
    for stage in spec.stage:
        out.update(defaults(stage))
    return out


def bases() -> list[tuple[str | None, str, dict[str, Any]]]:
    """``(group, name, node)`` of every base: one per declaration of a group with presets."""
    out: list[tuple[str | None, str, dict[str, Any]]] = [
        (None, "RunSettings", _base(TRAIN[""], None)), (None, "EvalRunSettings", _base(EVAL_RUN, None)),
        ("eval", "EvalSettings", eval_defaults())]
    for group in ("norm", "dictionary", "lca", "predictor", "loss", "targets", "study"):
        spec = TRAIN[group]
        decl = spec.target or spec.stage[0]
        out.append((group, decl.__name__, _base(spec, spec.target)))
    for key in ("model.dictionary", "model.warp", "model.classify"):
        out.append(("model", TRAIN[key].target.__name__, _base(TRAIN[key], TRAIN[key].target)))  # type: ignore
    for cls in dict.fromkeys(DATAMODULES.values()):
        out.append(("data", cls.__name__, _base(TRAIN["data"], cls)))
    return out


def register_bases() -> None:
    """Store :func:`bases` in Hydra's ConfigStore (idempotent), before Hydra composes a config."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, node in bases():
        store.store(name=name, node=node, group=group)


def default_config_dir() -> Path:
    """The Hydra config tree: ``warplca/conf`` inside an installed wheel (``setup.py`` copies it there),
    else the top-level ``conf/`` of the source checkout (editable installs, tests)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no Hydra configs: neither {package / 'conf'} nor {package.parents[1] / 'conf'} "
                            "holds train.yaml (reinstall warplca)")


def compose_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None,
                   config_name: str = "train", config_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose a config outside ``@hydra.main`` (tests, notebooks) with ``${hydra:...}`` resolvable;
    ``output_dir`` (default: the composed ``run_dir``) becomes the run directory."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    conf_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not conf_dir.is_dir():
        raise FileNotFoundError(f"config directory {conf_dir} does not exist")
    GlobalHydra.instance().clear()
    register_bases()
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        out = Path(output_dir) if output_dir is not None else Path(str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = str(out.resolve())
        cfg.hydra.run.dir = str(out)
        if output_dir is not None and "run_dir" in cfg:
            cfg.run_dir = str(out)
        if not cfg.hydra.runtime.get("cwd"):
            cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig().set_config(cfg)
    return cfg


def settings_reference() -> str:
    """docs/settings.md: every declared setting of every node, with its type, default and rule."""
    from warplca.settings import describe

    lines = ["# Settings reference", "", "Generated from the declarations in the code "
             "(`python -m warplca.config > docs/settings.md`); every default below is also the Python "
             "API's.", ""]
    for key, spec in TRAIN.items():
        decls = ([spec.target] if spec.target is not None else []) + list(spec.stage)
        lines += [f"## `{key or 'top level'}`", "", "| key | default | rule |", "|---|---|---|"]
        for decl in decls:
            for s in declared(decl).values():
                if s.name in spec.provided or s.required:
                    continue
                nested = dataclasses.is_dataclass(s.type)
                default = "(group)" if nested else f"`{show(defaults(decl)[s.name])}`"
                lines.append(f"| `{s.name}` | {default} | {describe(s).removeprefix('must be ')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_reference())
