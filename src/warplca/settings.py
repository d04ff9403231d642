"""Settings declared once, in the signature that uses them.

A constructor (or a settings dataclass) is the declaration of its settings: the annotation gives the type,
``Annotated[...]`` markers the allowed range (:class:`Ge`, :class:`Gt`, :class:`Le`, :class:`Lt`,
:class:`Odd`, :class:`NonEmpty`, :class:`OneOf`) and what it means (:class:`Doc`), the default value the
default. Everything else is derived from it: the checks of the Python API (:func:`checked`), the checks of
config nodes with their key paths (:func:`problems`), the Hydra group bases (:func:`defaults`) and the
settings reference in the docs. Imports nothing from warplca, so every layer can declare settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

__all__ = ["Annotated", "Checked", "Doc", "Ge", "Gt", "Le", "Lt", "NonEmpty", "Odd", "OneOf", "Setting",
           "SettingsError", "build", "checked", "declared", "defaults", "describe", "path_of", "problems",
           "show"]

Problem = tuple[str, str]
_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class _Bound:
    op: str
    bound: float

    def ok(self, v: float) -> bool:
        return {"≥": v >= self.bound, ">": v > self.bound, "≤": v <= self.bound, "<": v < self.bound}[self.op]


def Ge(bound: float) -> _Bound:  # noqa: N802 - reads like annotated-types' markers
    """Number ≥ ``bound``."""
    return _Bound("≥", bound)


def Gt(bound: float) -> _Bound:  # noqa: N802
    """Number > ``bound``."""
    return _Bound(">", bound)


def Le(bound: float) -> _Bound:  # noqa: N802
    """Number ≤ ``bound``."""
    return _Bound("≤", bound)


def Lt(bound: float) -> _Bound:  # noqa: N802
    """Number < ``bound``."""
    return _Bound("<", bound)


@dataclass(frozen=True)
class Odd:
    """An odd integer."""


@dataclass(frozen=True)
class NonEmpty:
    """A non-empty list."""


@dataclass(frozen=True)
class OneOf:
    """A string (or each string of a list) among ``names`` — a collection, or a callable returning one for
    registries that grow after import."""

    names: Iterable[str] | Callable[[], Iterable[str]]
    what: str = "value"

    def choices(self) -> list[str]:
        return list(self.names() if callable(self.names) else self.names)


@dataclass(frozen=True)
class Doc:
    """What the setting means (shown in error messages and the settings reference)."""

    text: str


@dataclass(frozen=True)
class Setting:
    """One declared setting: its name, type (without markers), markers, default (``_EMPTY``: required)."""

    name: str
    type: Any
    marks: tuple[Any, ...]
    default: Any

    @property
    def doc(self) -> str:
        return next((m.text for m in self.marks if isinstance(m, Doc)), "")

    @property
    def required(self) -> bool:
        return self.default is _EMPTY


class SettingsError(ValueError):
    """Values that break their declaration; ``problems`` lists ``(key, message)`` pairs, all of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(m for _, m in self.problems))


def path_of(obj: Any) -> str:
    """The importable ``module.QualName`` of a class or function (what ``_target_`` holds)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def show(value: Any) -> str:
    """``value`` as written on the command line (``null``, ``true``, ``[a,b]``)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(show, value)) + "]"
    if isinstance(value, (str, int, float, Mapping, os.PathLike)):
        return str(dict(value) if isinstance(value, Mapping) else value)
    return f"<{type(value).__name__}>"


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated annotations of ``fn`` with their ``Annotated`` extras; one that cannot be evaluated (a
    name imported only for type checkers) reads as ``Any``."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        out = {}
        for name, text in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(text, getattr(fn, "__globals__", {})) if isinstance(text, str) else text
            except Exception:
                out[name] = Any
        return out


@functools.cache
def declared(obj: Any) -> dict[str, Setting]:
    """The settings ``obj`` (a class, its constructor or a function; a dataclass: its fields) declares."""
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        hints = _hints(obj)
        return {f.name: _setting(f.name, hints.get(f.name, Any), _field_default(f))
                for f in dataclasses.fields(obj) if f.init}
    fn = obj.__init__ if isinstance(obj, type) else obj
    fn = inspect.unwrap(fn)
    hints = _hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    return {p.name: _setting(p.name, hints.get(p.name, Any), p.default) for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else _EMPTY


def _setting(name: str, hint: Any, default: Any) -> Setting:
    marks: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *extra = typing.get_args(hint)
        marks = tuple(extra)
    return Setting(name, hint, marks, default)


def _config_value(value: Any) -> Any:
    """Defaults as config values: tuples as lists, dataclass instances as mappings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _config_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _config_value(v) for k, v in value.items()}
    return value


def defaults(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{name: default}`` of every setting of ``obj`` that has one (the Python API's defaults)."""
    return {s.name: _config_value(s.default) for s in declared(obj).values()
            if not s.required and s.name not in skip}


# -- checking values ---------------------------------------------------------------------------------
def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fits(tp: Any, marks: tuple[Any, ...], v: Any) -> bool:
    """Whether ``v`` is of type ``tp`` and within ``marks`` (markers apply to numbers and strings)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return v is None
    if origin is Annotated:
        inner, *extra = typing.get_args(tp)
        return _fits(inner, (*marks, *extra), v)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(m, marks, v) for m in _members(tp))
    if origin is Literal:
        return v in typing.get_args(tp)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if not isinstance(v, (list, tuple)) or (any(isinstance(m, NonEmpty) for m in marks) and not v):
            return False
        return all(_fits(args[0], marks, x) for x in v)
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        return isinstance(v, Mapping)
    if tp is bool:
        return isinstance(v, bool)
    if tp in (int, float):
        ok = (isinstance(v, int) and not isinstance(v, bool)) if tp is int else _is_number(v)
        bounds = all(m.ok(v) for m in marks if isinstance(m, _Bound)) if ok else False
        return bounds and not (any(isinstance(m, Odd) for m in marks) and v % 2 == 0)
    if tp is str:
        one_of = next((m for m in marks if isinstance(m, OneOf)), None)
        return isinstance(v, str) and (one_of is None or v in one_of.choices())
    if origin is None and isinstance(tp, type):  # an object; a config may give an instantiable mapping
        return isinstance(v, tp) or (isinstance(v, Mapping) and "_target_" in v)
    if origin is Callable:
        return callable(v) or (isinstance(v, Mapping) and "_target_" in v)
    return True  # Callable[...], type[...] and other forms: instantiation decides


_NOUNS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
          type(None): "null"}


def _describe_type(tp: Any) -> list[str]:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _describe_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [d for m in _members(tp) for d in _describe_type(m)]
    if origin is Literal:
        return [show(a) for a in typing.get_args(tp)]
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _describe_type(args[0]) if args else []
        return ["a list" + (f" of {inner[0].removeprefix('an ').removeprefix('a ')}s" if inner else "")]
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return ["a mapping"]
    return [_NOUNS.get(tp, f"a {getattr(tp, '__name__', str(tp))}")]


def _choices(s: Setting) -> tuple[str, list[str]] | None:
    """(what, names) of a setting restricted to named strings (:class:`OneOf` or a ``Literal``)."""
    one_of = next((m for m in s.marks if isinstance(m, OneOf)), None)
    if one_of is not None:
        return one_of.what, one_of.choices()
    literals = [a for m in _members(s.type) if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    return ("value", [str(a) for a in literals]) if literals else None


def describe(s: Setting, value: Any = None) -> str:
    """The rule ``value`` breaks in words: ``must be an integer ≥ 1 (why)``, ``must be odd``, ``unknown
    threshold; known: hard, soft``."""
    why = f" ({s.doc})" if s.doc else ""
    named = _choices(s)
    numeric = any(m in (int, float) for m in _members(s.type))
    if isinstance(value, str) and named is not None and not numeric and not _fits(s.type, s.marks, value):
        return f"unknown {named[0]}; known: {', '.join(named[1])}{why}"
    if isinstance(value, (list, tuple)) and named is not None:
        unknown = [str(v) for v in value if v not in named[1]]
        if unknown:
            return f"unknown {named[0]}(s) {', '.join(unknown)}; known: {', '.join(named[1])}{why}"
    if (any(isinstance(m, Odd) for m in s.marks) and isinstance(value, int) and value % 2 == 0
            and all(m.ok(value) for m in s.marks if isinstance(m, _Bound))):
        return f"must be odd{why}"
    bounds = " and ".join(f"{m.op} {m.bound:g}" for m in s.marks if isinstance(m, _Bound))
    one_of = next((m for m in s.marks if isinstance(m, OneOf)), None)
    kinds = list(dict.fromkeys(_describe_type(s.type)))
    if one_of is not None:
        kinds = [k for k in kinds if k not in ("a string", "a list of strings")]
        choice = f"one of {', '.join(one_of.choices())}"
        kinds.insert(0, choice if "list" not in str(_describe_type(s.type)) else f"a list of {choice}")
    text = " or ".join(kinds)
    if bounds:
        for noun in ("finite numbers", "integers", "a finite number", "an integer"):
            if noun in text:
                text = text.replace(noun, f"{noun} {bounds}", 1)
                break
    if any(isinstance(m, Odd) for m in s.marks):
        text += ", odd"
    if any(isinstance(m, NonEmpty) for m in s.marks):
        text = "a non-empty " + text.removeprefix("a ")
    return f"must be {text}{why}"


def _nested(s: Setting) -> Any:
    """The settings dataclass a setting holds (a nested group), else None."""
    tp = s.type
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def problems(obj: Any, values: Mapping[str, Any], key: str = "", skip: Iterable[str] = (),
             extra: Iterable[str] = (), unknown: bool = True) -> list[Problem]:
    """Every problem of ``values`` against the settings ``obj`` declares, each as ``(key path, message)``:
    unknown names (with the closest known one), values of the wrong type or out of range. ``skip`` names
    settings given by code (not checked here), ``extra`` keys that may appear besides the declared ones."""
    settings = declared(obj)
    known = set(settings) | set(extra)
    out: list[Problem] = []
    prefix = f"{key}." if key else ""
    for name, v in values.items():
        path = f"{prefix}{name}"
        s = settings.get(name)
        if name in skip or name.startswith("_") or name in extra:
            continue
        if s is None:
            if unknown:
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                out.append((path, f"{path}: unknown key for {getattr(obj, '__name__', obj)}; known: "
                                  f"{sorted(known - set(skip))}{hint}"))
        elif _nested(s) is not None and isinstance(v, Mapping):
            out += problems(_nested(s), v, path)
        elif not _fits(s.type, s.marks, v):
            out.append((path, f"{path}={show(v)}: {describe(s, v)}"))
    return out


def checked(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a constructor so that the arguments it is given are checked against its declaration: one
    :class:`SettingsError` (a ``ValueError``) names every bad argument and the rule it breaks."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        given = {k: v for k, v in list(bound.arguments.items())[1:]}
        bad = problems(init, given, unknown=False)
        if bad:
            raise SettingsError(bad)
        init(self, *args, **kwargs)

    wrapper.__signature__ = signature  # type: ignore[attr-defined]  # getfullargspec sees the real one
    return wrapper


class Checked:
    """Base of settings dataclasses: construction checks every field against its declaration, then
    :meth:`cross_check` (rules that involve several fields; yields ``(field, value, rule)``)."""

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        bad = problems(type(self), values)
        bad += [(k, f"{k}={show(v)}: {rule}") for k, v, rule in self.cross_check()] if not bad else []
        if bad:
            raise SettingsError(bad)

    def cross_check(self) -> Iterable[tuple[str, Any, str]]:
        return ()


def build(cls: type, values: Mapping[str, Any] | None, key: str = "") -> Any:
    """An instance of the settings dataclass ``cls`` from a (partial, nested) mapping: absent keys take
    their declared defaults, nested settings dataclasses are built the same way; every problem at once as
    a :class:`SettingsError` whose keys are prefixed with ``key``."""
    values = dict(values or {})
    bad = problems(cls, values, key)
    if bad:
        raise SettingsError(bad)
    settings = declared(cls)
    kwargs: dict[str, Any] = {}
    for name, v in values.items():
        inner = _nested(settings[name])
        kwargs[name] = build(inner, v, f"{key}.{name}" if key else name) if inner and isinstance(
            v, Mapping) else (tuple(v) if isinstance(v, list) else v)
    try:
        return cls(**kwargs)
    except SettingsError as exc:
        prefix = f"{key}." if key else ""
        raise SettingsError([(f"{prefix}{k}", f"{prefix}{m}") for k, m in exc.problems]) from None
