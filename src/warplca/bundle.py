"""``WarpLCA``: dictionary + WARP-CNN predictor + LCA settings + normalisation, in one object and one file.

``model(x, iters)`` runs LCA from the predicted states u₀ = f_θ(x); ``model(x, iters, warm=False)`` is
cold LCA (u₀ = 0) with exactly the same solver, so warm/cold comparisons differ only in the start.

The start guard (on by default, also for older bundles) keeps WARP-LCA from starting above cold LCA's
energy E(0) = ½‖x‖²: where E(T_λ(û)) is higher, û is replaced by 0. It costs one synthesis Φa per start.

The predictor is any ``nn.Module`` with the predictor interface: ``forward(x)`` → states (B, K, ⌈H/s⌉,
⌈W/s⌉) (``forward(x, drive)`` with ``use_drive = True``, drive = Φᵀx) and ``config()`` → its constructor
keyword arguments as plain values. A bundle stores the class path and that config; loading rebuilds the
class only from an allowlist — the project's own classes (``warplca.…``) and those decorated with
:func:`register_predictor` — and reads the file with ``torch.load(weights_only=True)``, so a bundle
cannot make the loader import or run anything else.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from warplca.coder import SparseCoder
from warplca.lca.continuation import Continuation, solve_continuation
from warplca.lca.dictionary import ConvDictionary
from warplca.lca.solver import LCA, LCAResult, image_norms
from warplca.lca.thresholds import count_active
from warplca.serialization import load_checked, save_atomic
from warplca.settings import path_of

if TYPE_CHECKING:  # the data package imports Lightning; keep ``import warplca`` light
    from warplca.data.normalization import Normalization

__all__ = ["DEFAULT_PREDICTOR", "FORMAT", "PredictorNotAllowedError", "WarmStart", "WarpLCA",
           "check_predictor_target", "predictor_class", "predictor_hparams", "predictor_path",
           "rebuild_predictor", "register_predictor"]

FORMAT = "warplca.bundle"
#: the predictor of bundles and checkpoints that name no class (written before the class was saved)
DEFAULT_PREDICTOR = "warplca.models.warp_cnn.WarpCNN"
#: module prefix of the project's own classes, always allowed
_OWN = "warplca."
#: class path -> class, for predictors from outside the project (see :func:`register_predictor`)
_REGISTERED: dict[str, type[nn.Module]] = {}
_M = TypeVar("_M", bound=type[nn.Module])


class PredictorNotAllowedError(ValueError):
    """A saved predictor names a class outside the allowlist (or one that cannot be a predictor)."""


def predictor_path(cls: type) -> str:
    """The importable path ``module.QualName`` a bundle stores for the class ``cls``."""
    return path_of(cls)


def _class_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot be a saved predictor class (None: it can)."""
    if not inspect.isclass(obj):
        return f"is not a class (got a {type(obj).__name__})"
    if not issubclass(obj, nn.Module):
        return "is not a torch.nn.Module subclass"
    if "<locals>" in obj.__qualname__:
        return "is defined inside a function; a bundle can rebuild only module-level classes"
    if not callable(getattr(obj, "config", None)):
        return "has no config() method returning its constructor arguments (the bundle rebuilds it from them)"
    return None


def _allowed(path: str) -> bool:
    return path in _REGISTERED or path.startswith(_OWN)


def register_predictor(cls: _M) -> _M:
    """Class decorator: allow bundles and checkpoints to rebuild ``cls`` (a module-level ``nn.Module`` with
    ``config()``). The project's own classes need no registration; the module defining ``cls`` must be
    imported before a file naming it is loaded."""
    problem = _class_problem(cls)
    if problem is not None:
        raise TypeError(f"register_predictor: {getattr(cls, '__qualname__', cls)!r} {problem}")
    _REGISTERED[predictor_path(cls)] = cls
    return cls


def _locate(path: str) -> Any:
    """The object at the dotted ``path`` (the longest importable module prefix, then attributes)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # this prefix is no module: try a shorter one
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"{path!r} is not a dotted module.Class path")


def check_predictor_target(path: Any) -> str | None:
    """The problem with ``path`` as ``predictor._target_`` (None: fine), for config validation before any
    work: not importable, not an ``nn.Module`` class, no ``config()``, or not allowed in bundles. Imports
    ``path`` (the config names it), so a class registered by its own module counts as registered."""
    if not isinstance(path, str) or not path.strip():
        return f"must be an importable class path such as {DEFAULT_PREDICTOR}, got {path!r}"
    try:
        obj = _locate(path)
    except Exception as exc:  # any error while importing the user's module
        return f"cannot be imported ({type(exc).__name__}: {exc})"
    problem = _class_problem(obj)
    if problem is not None:
        return problem
    if not _allowed(predictor_path(obj)):
        return (f"is not allowed in warp_lca.pt bundles (the warp stage could not save it): decorate "
                f"{obj.__qualname__} with @warplca.bundle.register_predictor")
    return None


def predictor_class(path: str) -> type[nn.Module]:
    """The allowlisted predictor class at ``path``; :class:`PredictorNotAllowedError` for any other path
    (checked before anything is imported)."""
    if not isinstance(path, str) or not _allowed(path):
        raise PredictorNotAllowedError(
            f"predictor class {path!r} is not allowed: only warplca classes and classes decorated with "
            f"@warplca.bundle.register_predictor are rebuilt from files (import the module that registers "
            f"it before loading)")
    if path in _REGISTERED:
        return _REGISTERED[path]
    try:
        obj = _locate(path)
    except (ImportError, AttributeError) as exc:
        raise PredictorNotAllowedError(f"predictor class {path!r} cannot be imported: {exc}") from exc
    problem = _class_problem(obj) or (None if _allowed(predictor_path(obj)) else
                                      f"resolves to {predictor_path(obj)}, outside the allowlist")
    if problem is not None:
        raise PredictorNotAllowedError(f"predictor class {path!r} {problem}")
    return obj


def predictor_hparams(predictor: nn.Module) -> dict[str, Any]:
    """The predictor as checkpoint hyperparameters: ``{"_target_": class path, **config()}``, or
    ``{"class": class path}`` when it has no ``config()`` (it must then be passed when loading)."""
    path = predictor_path(type(predictor))
    config = getattr(predictor, "config", None)
    return {"_target_": path, **config()} if callable(config) else {"class": path}


def rebuild_predictor(hparams: Mapping[str, Any]) -> nn.Module:
    """The inverse of :func:`predictor_hparams` (a mapping without ``_target_`` is a WarpCNN config)."""
    if "class" in hparams:
        raise ValueError(f"a {hparams['class']} predictor cannot be rebuilt from its hyperparameters; "
                         f"pass it: load_from_checkpoint(path, predictor=...)")
    config = dict(hparams)
    return predictor_class(str(config.pop("_target_", DEFAULT_PREDICTOR)))(**config)


def _plain_problem(value: Any, where: str) -> str | None:
    """Where ``value`` holds something ``torch.load(weights_only=True)`` would refuse (None: plain)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _plain_problem(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r}"
            if (p := _plain_problem(v, f"{where}.{k}")) is not None:
                return p
        return None
    return f"{where} is a {type(value).__name__} (a bundle saves None, bool, int, float, str, lists, dicts)"


def _predictor_entry(predictor: nn.Module) -> dict[str, Any]:
    """The bundle's ``predictor`` entry: class path, config and CPU weights; refused early (ValueError)
    when the file could not be loaded back."""
    cls = type(predictor)
    path = predictor_path(cls)
    problem = _class_problem(cls) or (None if _allowed(path) else
                                      "is not allowed in bundles: decorate it with @register_predictor")
    if problem is not None:
        raise ValueError(f"cannot save the predictor: {path} {problem}")
    config = predictor.config()
    problem = _plain_problem(config, "config()") if isinstance(config, dict) else (
        f"config() returned a {type(config).__name__}, not a dict")
    if problem is not None:
        raise ValueError(f"cannot save the predictor {path}: {problem}")
    try:
        inspect.signature(cls).bind(**config)
    except TypeError as exc:
        raise ValueError(f"cannot save the predictor {path}: config() does not match its constructor "
                         f"({exc})") from exc
    state = {k: v.detach().cpu().clone() for k, v in predictor.state_dict().items()}
    return {"target": path, "config": config, "state_dict": state}


@dataclass
class WarmStart:
    """The start WARP-LCA takes for a batch: ``states`` u₀ (B, K, H', W'), i.e. û with 0 for images the
    guard sent back; ``predicted`` û itself; (B,) ``guarded`` (E(T_λ(û)) > ½‖x‖²), ``energy`` E(T_λ(û))
    and ``cold_energy`` ½‖x‖², None when the guard is off."""

    states: Tensor
    predicted: Tensor
    guarded: Tensor | None = None
    energy: Tensor | None = None
    cold_energy: Tensor | None = None


class WarpLCA(SparseCoder):
    """WARP-LCA: LCA warm-started from a learned state prediction (a :class:`SparseCoder` + predictor).

    ``predictor`` is a :class:`~warplca.models.WarpCNN` or any ``nn.Module`` with the predictor interface
    (module docstring); its ``in_channels``, ``n_atoms`` and ``stride``, where it has them, must be the
    dictionary's, and its states must have the dictionary's code shape. ``start_guard`` starts from 0
    where the predicted start's energy exceeds ½‖x‖² (module docstring). ``tail``: run warm starts as a
    λ-continuation from the prediction (λ annealed from ``tail.start_factor``·λ down to λ) instead of
    plain LCA at λ — lower minima at larger budgets (the convergence report's fair baselines measure it).
    """

    def __init__(self, dictionary: ConvDictionary, predictor: nn.Module, lca: LCA | None = None,
                 normalization: Normalization | None = None, start_guard: bool = True,
                 tail: Continuation | None = None) -> None:
        super().__init__(dictionary, lca, normalization)
        if not isinstance(start_guard, bool):
            raise ValueError(f"start_guard must be True or False, got {start_guard!r}")
        if tail is not None and not isinstance(tail, Continuation):
            raise ValueError(f"tail must be a Continuation schedule or None, got {type(tail).__name__}")
        if not isinstance(predictor, nn.Module):
            raise ValueError(f"predictor must be a torch.nn.Module, got {type(predictor).__name__}")
        geometry = {"in_channels": dictionary.in_channels, "n_atoms": dictionary.n_atoms,
                    "stride": dictionary.stride}
        expected = {k: v for k, v in geometry.items() if hasattr(predictor, k)}
        got = {k: getattr(predictor, k) for k in expected}
        if got != expected:
            raise ValueError(f"predictor does not fit the dictionary: expected {expected}, got {got}")
        self.predictor = predictor
        self.start_guard = start_guard
        self.tail = tail
        self.meta: dict[str, Any] = {}

    def forward(self, x: Tensor, iters: int = 10, warm: bool = True, trace: bool = False,
                grad: bool = False) -> LCAResult:
        """LCA on ``x`` (coded space) for ``iters`` steps from the warm start (``warm``) or 0; warm runs
        with a ``tail`` anneal λ down to the solver's (no trace: its stages run at other λ)."""
        if not warm or self.tail is None:
            return super().forward(x, iters=iters, warm=warm, trace=trace, grad=grad)
        if trace or grad:
            raise ValueError("trace and grad are not available for a warm start with a continuation tail")
        self.check_input(x)
        return solve_continuation(self.lca, x, iters, self.tail, u0=self.initial_states(x))

    def predict_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """The predictor's states û = f_θ(x) (B, K, ⌈H/s⌉, ⌈W/s⌉) for images ``x`` in the coded space."""
        self.check_input(x)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):  # no graph into the drive otherwise
            if getattr(self.predictor, "use_drive", False):
                u = self.predictor(x, self.dictionary.encode(x))
            else:
                u = self.predictor(x)
        expected = (x.shape[0], *self.dictionary.code_shape(*x.shape[-2:]))
        if not isinstance(u, Tensor) or tuple(u.shape) != expected:
            raise ValueError(f"the predictor {type(self.predictor).__name__} must return states of shape "
                             f"{expected} (B, K, ⌈H/s⌉, ⌈W/s⌉), got "
                             f"{tuple(getattr(u, 'shape', ())) or type(u).__name__}")
        return u

    def guard(self, x: Tensor, u: Tensor) -> WarmStart:
        """The start guard on predicted states ``u`` for images ``x`` (coded space), whatever ``start_guard``.

        Per image, the solver's energy E(T_λ(u)) = ½‖x − Φ T_λ(u)‖² + Σ P_λ(T_λ(u)) is compared with
        E(0) = ½‖x‖²; where it is higher the state is replaced by 0. Predictions without any active
        coefficient are kept. Gradients flow through the kept states.
        """
        self.lca._check_codes(x, u.detach(), "u0")  # shape, dtype, NaN/Inf: as the solver would say
        with torch.no_grad():
            a = self.lca.states_to_codes(u.detach())
            energy = self.lca.energy(x.detach(), a)
            cold = 0.5 * image_norms(x.detach()).square()
            guarded = (count_active(a) > 0) & (energy > cold)
        states = torch.where(guarded.view(-1, *([1] * (u.dim() - 1))), torch.zeros_like(u), u)
        return WarmStart(states=states, predicted=u, guarded=guarded, energy=energy, cold_energy=cold)

    def warm_start(self, x: Tensor, grad: bool = False) -> WarmStart:
        """The predicted states û = f_θ(x) and, with ``start_guard``, the guarded start u₀."""
        u = self.predict_states(x, grad=grad)
        return self.guard(x, u) if self.start_guard else WarmStart(states=u, predicted=u)

    def initial_states(self, x: Tensor, grad: bool = False) -> Tensor:
        """u₀: the warm start f_θ(x), with 0 for images the start guard sends back (if it is on)."""
        return self.warm_start(x, grad=grad).states

    def to_payload(self) -> dict[str, Any]:
        """Everything :meth:`load` needs, as plain objects and CPU tensors (the predictor as its class path,
        ``config()`` and weights); ValueError for a predictor a bundle could not rebuild."""
        return {
            "dictionary": self.dictionary.to_payload(),
            "predictor": _predictor_entry(self.predictor),
            "lca": self.lca.settings(),
            "normalization": None if self.normalization is None else self.normalization.to_dict(),
            "start_guard": self.start_guard,
            "tail": None if self.tail is None else dataclasses.asdict(self.tail),
        }

    def save(self, path: str | os.PathLike, **meta: Any) -> Path:
        """Write the bundle (and plain-Python ``meta``) atomically to one file."""
        return save_atomic({**self.to_payload(), "meta": meta}, path, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> WarpLCA:
        """Read a bundle written by :meth:`save`; foreign, truncated or inconsistent files: ValueError, a
        predictor class outside the allowlist: :class:`PredictorNotAllowedError` (a ValueError)."""
        from warplca.data.normalization import Normalization

        payload = load_checked(path, FORMAT, map_location)  # weights_only=True
        entry = payload.get("predictor")
        target = entry.get("target", DEFAULT_PREDICTOR) if isinstance(entry, dict) else DEFAULT_PREDICTOR
        try:
            net_class = predictor_class(target)
        except PredictorNotAllowedError as exc:
            raise PredictorNotAllowedError(f"{path}: {exc}") from exc
        try:
            dictionary = ConvDictionary.from_payload(payload["dictionary"])
            predictor = net_class(**payload["predictor"]["config"])
            predictor.load_state_dict(payload["predictor"]["state_dict"])
            lca = LCA(dictionary, **payload["lca"])
            norm = payload.get("normalization")
            tail = payload.get("tail")
            model = cls(dictionary, predictor, lca, None if norm is None else Normalization.from_dict(norm),
                        start_guard=payload.get("start_guard", True),  # older bundles: guard on
                        tail=None if tail is None else Continuation(**tail))
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: inconsistent {FORMAT} artifact: {exc}") from exc
        model.meta = dict(payload.get("meta") or {})
        return model.to(map_location)

