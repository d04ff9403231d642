"""Validate a composed train or evaluate config before anything runs, reporting every problem at once.

Groups are parsed as declared in :mod:`warplca.config_settings`, then :mod:`warplca.preflight` runs
the cross-group checks; one :class:`ConfigError` lists every problem as ``key=value: rule`` (``key:
rule`` for a missing or misplaced key), a :class:`ConfigFileError` if a file is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from warplca import config_settings as cs
from warplca import preflight
from warplca.config_parsing import Parser, Problem

__all__ = ["HOME_NODES", "ConfigError", "ConfigFileError", "check_eval_config", "check_train_config",
           "validate_eval_config", "validate_train_config"]

#: config nodes a misplaced key is looked up in, to say where it belongs
HOME_NODES = ("lca", "loss", "predictor", "dictionary", "norm", "data", "targets", "study",
              "model.dictionary", "model.warp", "model.classify", "trainer")


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


def check_train_config(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed train config as ``(key, message)`` pairs (empty: valid)."""
    p = Parser(cfg, HOME_NODES)
    groups = {key: p.parse(key, group) for key, group in cs.TRAIN.items()}
    preflight.check_train(p, cfg, groups)
    return list(dict.fromkeys(p.problems))  # each problem once


def check_eval_config(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed evaluate config as ``(key, message)`` pairs (empty: valid)."""
    p = Parser(cfg, HOME_NODES)
    run = p.parse("", cs.EVAL_RUN) or {}
    preflight.check_eval(p, run)
    if not run.get("sweep_dir"):  # a sweep summary reads no eval settings
        p.parse("eval", cs.EVAL)
    p.parse("data", cs.TRAIN["data"])
    p.parse("logger", cs.INSTANCES)
    return list(dict.fromkeys(p.problems))


def _raise(problems: list[Problem]) -> None:
    if problems:
        missing = any(m.endswith((": no such file", ": no such directory")) for _, m in problems)
        raise (ConfigFileError if missing else ConfigError)(problems)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a train config (see the module doc)."""
    _raise(check_train_config(cfg))


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of an evaluate config."""
    _raise(check_eval_config(cfg))
