"""Read the settings of a composed config with one generic parser that records every problem at once.

A :class:`Group` declares which keys a node may hold (:class:`Keys`, :class:`Target`, :class:`Yaml`) and
a :class:`Rule` per key. :meth:`Parser.parse` reads a node into ``{key: value}``, recording a
``(key, message)`` problem per bad value or unknown key; absent or refused keys read None.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from warplca.config_defaults import option_defaults, primary_defaults

__all__ = ["Group", "Instances", "Keys", "Parser", "Problem", "Rule", "Settings", "Target", "Yaml",
           "is_number", "locate", "show"]

Problem = tuple[str, str]
#: a parsed config node, ``{key: value}``
Settings = dict[str, Any]
_ABSENT: Any = object()
_META = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_NOUNS = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          str: ("a string", "strings"), bool: ("true or false", ""), dict: ("a mapping", "")}


def show(value: Any) -> str:
    """``value`` as written on the command line (``null``, ``true``, ``[a,b]``)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return "[" + ",".join(map(show, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """Whether ``v`` is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@cache
def locate(path: str) -> Any:
    """The object at the dotted ``path`` (None when it cannot be imported)."""
    from hydra.utils import get_method

    try:
        return get_method(path)
    except Exception:
        return None


@dataclass(frozen=True)
class Rule:
    """A value's type and constraints: bounds and ``odd`` for numbers, ``one_of`` for strings (for each
    element of a list), extra integers ``also``, a last ``test``; ``say`` replaces the message."""

    type: Any
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    odd: bool = False
    one_of: Sequence[Any] | None = None
    what: str = "value"
    nonempty: bool = False
    also: tuple[int, ...] = ()
    test: Callable[[Any], bool] | None = None
    say: str = ""
    why: str = ""


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _in_bounds(r: Rule, v: float) -> bool:
    return ((r.ge is None or v >= r.ge) and (r.gt is None or v > r.gt) and (r.le is None or v <= r.le)
            and (r.lt is None or v < r.lt))


def _fits(tp: Any, r: Rule, v: Any) -> bool:
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return isinstance(v, list) and bool(v or not r.nonempty) and all(_fits(elem, r, x) for x in v)
    if tp in (int, float):
        number = _is_int(v) if tp is int else is_number(v)
        return number and _in_bounds(r, v) and not (r.odd and v % 2 == 0)
    if tp is str:
        return isinstance(v, str) and (r.one_of is None or v in r.one_of)
    return tp is Any or (v is None if tp is type(None) else isinstance(v, tp))


def _valid(r: Rule, v: Any) -> bool:
    typed = (_is_int(v) and v in r.also) or any(_fits(m, r, v) for m in _members(r.type))
    return typed and (v is None or r.test is None or r.test(v))


def _message(r: Rule, v: Any) -> str:
    """The rule a refused value breaks (the text after ``key=value:``)."""
    members = [m for m in _members(r.type) if m is not type(None)]
    plurals = [_NOUNS[typing.get_args(m)[0]][1] for m in members if typing.get_origin(m) is list]
    bounds = " and ".join(f"{op} {b:g}" for op, b in (("≥", r.ge), (">", r.gt), ("≤", r.le), ("<", r.lt))
                          if b is not None)
    bounds = f" {bounds}" if bounds else ""
    extra = [show(a) for a in r.also] + (["null"] if len(members) < len(_members(r.type)) else [])
    if r.say:
        text, extra = r.say, []
    elif isinstance(v, str) and r.one_of is not None and str in members:
        text = f"unknown {r.what}; known: {', '.join(map(show, r.one_of))}"
    elif r.odd and _is_int(v) and _in_bounds(r, v):
        text = "must be odd"
    elif plurals:
        of = f"subset of {list(r.one_of)}" if r.one_of is not None else f"list of {plurals[0]}{bounds}"
        text = "must be a " + ("non-empty " if r.nonempty else "") + of
    else:
        text = "must be " + " or ".join(_NOUNS[m][0] for m in members if m in _NOUNS) + bounds
    return text + (f" (or {' / '.join(extra)})" if extra else "") + (f" ({r.why})" if r.why else "")


def _peek(node: Mapping[str, Any], key: str) -> Any:
    try:
        return node.get(key)
    except Exception:  # an unresolvable interpolation: reported where the value is read
        return None


class Keys:
    """Which keys a node may hold: here any (the top level of a config, whose groups have their own)."""

    def check(self, p: Parser, key: str, node: Mapping[str, Any]) -> None:
        """Record each key of ``node``, the node at ``key``, that it may not hold."""


@dataclass(frozen=True)
class Yaml(Keys):
    """The keys at every depth of the YAML option ``group/option`` (default: the one ``train.yaml``
    chooses); ``free`` names sub-mappings with open keys."""

    group: str
    option: str | None = None
    free: tuple[str, ...] = ()

    def check(self, p: Parser, key: str, node: Mapping[str, Any], yaml: Mapping[str, Any] | None = None
              ) -> None:
        if yaml is None:
            yaml = option_defaults(self.group, self.option) if self.option else primary_defaults(self.group)
        for k in map(str, node):
            sub, value = f"{key}.{k}", _peek(node, k)
            if k not in yaml:
                p.unknown(key, k, yaml, f"in {key}")
            elif isinstance(yaml[k], Mapping) and isinstance(value, Mapping) and sub not in self.free:
                self.check(p, sub, value, yaml[k])


@dataclass(frozen=True)
class Target(Keys):
    """The arguments of the class the node instantiates (``_target_``, else ``default``), a subclass of
    ``base``; the stage reads ``extra`` keys too, the pipeline passes ``provided`` ones itself (a mapping
    says, per key, where it is configured instead)."""

    default: str | None = None
    base: str | None = None
    provided: Iterable[str] | Mapping[str, str] = ()
    extra: Iterable[str] = ()

    def check(self, p: Parser, key: str, node: Mapping[str, Any]) -> None:
        path = _peek(node, "_target_") or self.default
        if path is None:
            return
        obj, base = locate(str(path)), locate(self.base) if self.base else None
        if obj is None:
            return p.bad(f"{key}._target_", path, "cannot be imported (check spelling and installed extras)")
        if base is not None and not (inspect.isclass(obj) and issubclass(obj, base)):
            return p.bad(f"{key}._target_", path, f"must be a {base.__name__} subclass")
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return
        if any(a.kind == a.VAR_KEYWORD for a in params):
            return
        hints = self.provided if isinstance(self.provided, Mapping) else {}
        known = {a.name for a in params if a.kind in (a.POSITIONAL_OR_KEYWORD, a.KEYWORD_ONLY)}
        known = (known | set(self.extra)) - set(self.provided)
        for k in map(str, node):
            if k in hints:
                p.bad(f"{key}.{k}", _peek(node, k), f"does not belong under {key}: {hints[k]}")
            elif k in self.provided:
                p.note(f"{key}.{k}", "is set by the pipeline itself; remove it from the config")
            elif k not in known | _META:
                p.unknown(key, k, known, f"for {getattr(obj, '__name__', path)}")


class Instances(Keys):
    """Any names, each null or ``{_target_: …}`` with keys its class takes (``logger``, ``callbacks``)."""

    def check(self, p: Parser, key: str, node: Mapping[str, Any]) -> None:
        for name, conf in ((str(k), _peek(node, str(k))) for k in node):
            if conf is not None and not (isinstance(conf, Mapping) and "_target_" in conf):
                p.bad(f"{key}.{name}", conf, "must be a config with a _target_ (or null to drop it)")
            elif conf is not None:
                Target().check(p, f"{key}.{name}", conf)


@dataclass(frozen=True)
class Group:
    """A config node: the keys it may hold (None: the first parts of its rules' keys), a :class:`Rule` per
    key (a dotted key lies deeper) and ``check``, which yields ``(key, value, rule)`` for problems that
    involve several keys of the parsed node."""

    keys: Keys | None
    rules: Mapping[str, Rule]
    check: Callable[[Settings], Iterator[tuple[str, Any, str]]] | None = None


class Parser:
    """Reads config nodes out of ``cfg``, collecting :attr:`problems`; ``homes`` are the nodes an unknown key
    is looked up in, to say where a misplaced key belongs."""

    def __init__(self, cfg: DictConfig, homes: Sequence[str] = ()) -> None:
        self.cfg, self.homes = cfg, tuple(homes)
        self.problems: list[Problem] = []

    def bad(self, key: str, value: Any, rule: str) -> None:
        """Record ``key=value: rule``."""
        self.problems.append((key, f"{key}={show(value)}: {rule}"))

    def note(self, key: str, message: str) -> None:
        """Record ``key: message`` (a missing or misplaced key)."""
        self.problems.append((key, f"{key}: {message}"))

    def value(self, key: str, plain: bool = True) -> Any:
        """The resolved value at ``key``, lists (and with ``plain`` mappings) as Python objects;
        ``_ABSENT`` when absent or unresolvable (recorded)."""
        try:
            v = OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
            plainer = isinstance(v, ListConfig) or (plain and isinstance(v, DictConfig))
            return OmegaConf.to_container(v, resolve=True) if plainer else v
        except Exception as exc:  # interpolation to a missing key, a failing resolver, …
            self.note(key, f"cannot be resolved: {exc}".splitlines()[0])
            return _ABSENT

    def unknown(self, key: str, leaf: str, known: Iterable[str], what: str) -> None:
        """Record the unknown key ``<key>.<leaf>`` with a close known key (a typo), else the :attr:`homes`
        that have a key of that name (a misplaced key)."""
        known = sorted(set(known))
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.75)
        nodes = {h: OmegaConf.select(self.cfg, h, default=None, throw_on_resolution_failure=False)
                 for h in self.homes if h != key}
        homes = [f"{h}.{leaf}" for h, n in nodes.items() if isinstance(n, DictConfig) and leaf in n]
        hint = f"; did you mean {key}.{close[0]}?" if close else (
            f"; it belongs to {' or '.join(homes)}" if homes else "")
        self.note(f"{key}.{leaf}", f"unknown key {what}; known: {known}{hint}")

    def parse(self, key: str, group: Group) -> Settings | None:
        """The node at ``key`` (``""``: the top level) read as ``{key: value}``; None when absent or null."""
        node = self.value(key, plain=False) if key else self.cfg
        if node is _ABSENT or node is None:
            return None
        if not isinstance(node, DictConfig):
            return self.bad(key, node, "must be a config node (a mapping)")
        if group.keys is not None:
            group.keys.check(self, key, node)
        else:
            names = {name.split(".")[0] for name in group.rules}
            for k in (k for k in map(str, node) if k not in names):
                self.unknown(key, k, names, f"in {key}")
        values: Settings = {}
        for name, r in group.rules.items():
            sub = f"{key}.{name}" if key else name
            v = self.value(sub)
            if v is not _ABSENT and not _valid(r, v):
                self.bad(sub, v, _message(r, v))
                v = _ABSENT
            elif isinstance(v, dict) and "_target_" in v:  # e.g. trainer.strategy: {_target_: …}
                Target().check(self, sub, v)
            values[name] = None if v is _ABSENT else v
        for name, v, text in group.check(values) if group.check else ():
            self.bad(f"{key}.{name}" if key else name, v, text)
        return values

