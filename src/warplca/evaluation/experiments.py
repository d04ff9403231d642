"""The experiments as the ``evaluate`` command and the pipeline's ``report`` stage run them.

Both take settings from :func:`eval_settings`, images from :func:`eval_images` and the convergence
experiment from :func:`run_convergence`, so the main job's closing table and ``python evaluate.py``
agree. Library code imports from here, never from the command module :mod:`warplca.tasks.evaluate`.

An evaluation mode (``eval.modes``, ``eval=<name>``) is a function ``run(session) -> ExperimentResult``
registered where it is defined with :func:`evaluation`; its settings are ``conf/eval/<name>.yaml``. Every
module of :mod:`warplca.evaluation` is imported the first time the registry is read, so a module there
registers its modes; one elsewhere registers them when it is imported.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

import torch
from omegaconf import DictConfig, OmegaConf

from warplca.evaluation.common import EvalModel, ExperimentResult, load_images
from warplca.settings import Annotated, Checked, Doc, Ge, NonEmpty, OneOf, SettingsError, build, defaults

log = logging.getLogger(__name__)

__all__ = ["MODES", "EvalRunSettings", "EvalSession", "EvalSettings", "Evaluation", "eval_defaults",
           "eval_images", "eval_problems", "eval_settings", "evaluation", "evaluations", "get_evaluation",
           "run_convergence"]


class EvalSession(Protocol):
    """What an evaluation mode gets from ``python evaluate.py``: the composed config ``cfg``, the merged
    ``settings`` (:func:`eval_settings`; the mode's section is ``settings[<name>]``), the run and output
    directories, the device, and the model and images (loaded on first use)."""

    cfg: DictConfig
    settings: dict[str, Any]
    run_dir: Path
    out_dir: Path
    device: torch.device
    show_progress: bool
    data_name: str

    @property
    def model(self) -> EvalModel: ...

    @property
    def images(self) -> Any: ...

    def split_images(self, split: str, n_images: int | None) -> Any:
        """The first ``n_images`` of another ``split`` of the run's data (e.g. val, to choose settings on)."""
        ...

    def total(self, override: Any = None) -> int:
        """The reference budget T: ``override``, else ``eval.iters``, else the bundle's ``lca.iters``."""
        ...

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every ``measure_*`` experiment takes (batch size, progress, device)."""
        ...


EvalFn = Callable[[EvalSession], ExperimentResult]


@dataclass(frozen=True)
class Evaluation:
    """A registered evaluation mode: its ``name``, the function that runs it, the defining module and the
    settings dataclass of its section ``eval.<name>`` (None: it has none)."""

    name: str
    run: EvalFn
    module: str
    settings: type | None = None


_EVALUATIONS: dict[str, Evaluation] = {}
_discovered = False


def evaluation(name: str, settings: type | None = None) -> Callable[[EvalFn], EvalFn]:
    """Decorator: register ``run(session) -> ExperimentResult`` as the evaluation mode ``name``
    (``eval.modes: [name]``; its section ``eval.<name>`` is declared by the dataclass ``settings``, a
    :class:`warplca.settings.Checked`; the preset ``conf/eval/<name>.yaml`` selects it)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an evaluation name must be an identifier, got {name!r}")

    def register(fn: EvalFn) -> EvalFn:
        where = f"{fn.__module__}.{fn.__qualname__}"
        known = _EVALUATIONS.get(name)
        if known is not None and f"{known.module}.{known.run.__qualname__}" != where:
            raise ValueError(f"evaluation {name!r} is already registered by {known.module}")
        _EVALUATIONS[name] = Evaluation(name, fn, fn.__module__, settings)
        return fn

    return register


def _discover() -> None:
    """Import every module of :mod:`warplca.evaluation` once, so that their modes are registered."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # set first: the modules read the registry while they are imported
    package = importlib.import_module("warplca.evaluation")
    try:
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    except BaseException:
        _discovered = False  # report the broken module again next time, not a partial registry
        raise


def evaluations() -> dict[str, Evaluation]:
    """Every registered evaluation mode by name (the package's own ones first)."""
    _discover()
    return dict(_EVALUATIONS)


def get_evaluation(name: str) -> Evaluation:
    """The evaluation registered as ``name``; ValueError naming the registered modes otherwise."""
    found = evaluations().get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown evaluation mode {name!r}; registered: {sorted(_EVALUATIONS)}")
    return found


class _Modes(Sequence[str]):
    """The registered mode names: a live, read-only view (a mode registered later is known too)."""

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return tuple(evaluations())[index]

    def __len__(self) -> int:
        return len(evaluations())

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(evaluations()))

    def __contains__(self, name: object) -> bool:
        return name in evaluations()

    def __repr__(self) -> str:
        return repr(tuple(evaluations()))


#: the experiments ``eval.modes`` may name: every registered evaluation mode
MODES: Sequence[str] = _Modes()


@dataclass(frozen=True)
class EvalSettings(Checked):
    """The ``eval`` group's keys shared by every mode (each mode's section is declared where it is
    registered); a train config's report stage reads them too."""

    modes: Annotated[Sequence[str], OneOf(MODES, "evaluation mode"),
                     Doc("the experiments to run")] = ("convergence",)
    split: Annotated[str, OneOf(("train", "val", "test"), "split")] = "test"
    n_images: Annotated[int | None, Ge(1), Doc("images of the split (null: all)")] = 64
    batch_size: Annotated[int, Ge(1)] = 64
    iters: Annotated[int | None, Ge(1), Doc("the reference budget T (null: lca.iters)")] = None
    budgets: Annotated[Sequence[int], Ge(1), NonEmpty(), Doc("budgets k tabulated")] = (1, 10, 100, 1000)


@dataclass(frozen=True)
class EvalRunSettings(Checked):
    """The top-level keys of an evaluate config (``conf/eval.yaml``; ``eval`` and ``data`` are groups)."""

    task_name: str = "evaluate"
    run_dir: Annotated[str | None, Doc("a training run directory (warp_lca.pt, .hydra/config.yaml)")] = None
    bundle: Annotated[str | None, Doc("a warp_lca.pt to use instead of <run_dir>/warp_lca.pt")] = None
    out_dir: Annotated[str | None, Doc("where results go (null: run_dir)")] = None
    sweep_dir: Annotated[str | None, Doc("a multirun directory: write its sweep summary instead")] = None
    sweep_metrics: Annotated[Sequence[str] | None, Doc("metrics the sweep summary plots")] = None
    results_md: Annotated[str | None, Doc("also write a README-ready results page")] = None
    device: Annotated[str, Doc("auto | cpu | cuda | cuda:<n> | mps")] = "auto"
    seed: Annotated[int | None, Ge(0), Doc("seeds the denoising noise and the data crops")] = 0
    progress: Annotated[bool, Doc("show progress bars")] = True

    def cross_check(self) -> Iterable[tuple[str, Any, str]]:
        cuda = self.device.startswith("cuda:") and self.device[5:].isdigit()
        if self.device not in ("auto", "cpu", "cuda", "mps") and not cuda:
            yield "device", self.device, "must be auto, cpu, cuda, cuda:<n> or mps"


def eval_defaults() -> dict[str, Any]:
    """The ``eval`` group's base: :class:`EvalSettings` plus every registered mode's section."""
    out = defaults(EvalSettings)
    out.update({name: defaults(e.settings) for name, e in evaluations().items() if e.settings is not None})
    return out


def eval_problems(node: Mapping[str, Any] | None, key: str = "eval") -> list[tuple[str, str]]:
    """Every problem of an ``eval`` node (plain, resolved) against :class:`EvalSettings` and the sections of
    the registered modes."""
    node = dict(node or {})
    modes = evaluations()
    sections = {k: node.pop(k) for k in list(node) if k in modes}
    out: list[tuple[str, str]] = []
    try:
        build(EvalSettings, node, key)
    except SettingsError as exc:
        out += exc.problems
    for name, section in sections.items():
        cls = modes[name].settings
        try:
            if cls is None and section:
                raise SettingsError([(f"{key}.{name}", f"{key}.{name}: the {name} mode takes no settings")])
            if cls is not None:
                build(cls, section, f"{key}.{name}")
        except SettingsError as exc:
            out += exc.problems
    return out


def eval_settings(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The evaluation settings of ``cfg`` as plain Python: its ``eval`` node over :func:`eval_defaults`,
    interpolations resolved against ``cfg``."""
    node = cfg.get("eval") if cfg is not None and hasattr(cfg, "get") else None
    values = OmegaConf.merge(eval_defaults(), node if node is not None else {})
    if isinstance(cfg, DictConfig):  # resolve ${seed}, ${paths.data_dir} & co. against the run's config
        root = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "eval"])
        OmegaConf.set_readonly(root, False)
        OmegaConf.set_struct(root, False)
        root["eval"] = values
        values = root["eval"]
    out = OmegaConf.to_container(values, resolve=True)
    problems = eval_problems(out)
    if problems:
        raise SettingsError(problems)
    return out  # type: ignore[return-value]


def eval_images(dm: Any, model: EvalModel, split: str, n_images: int | None) -> Any:
    """The first ``n_images`` of ``split``, channels matched to the model (grey -> RGB, RGB -> luminance)."""
    from warplca.evaluation.ood import match_channels

    images, note = match_channels(load_images(dm, split, n_images), model.dictionary.in_channels)
    if note:
        log.warning("evaluation data: %s", note)
    return images


def run_convergence(model: EvalModel, images: Any, settings: Mapping[str, Any], name: str = "",
                    show_progress: bool = True, device: Any = None) -> Any:
    """Experiment 1's ``ConvergenceResult`` with the :func:`eval_settings` ``settings`` (T: ``lca.iters``)."""
    from warplca.evaluation.baselines import BaselineSettings
    from warplca.evaluation.convergence import TimingSettings, measure_convergence
    from warplca.settings import build

    conv = settings["convergence"]
    return measure_convergence(
        model, images, iters=int(settings.get("iters") or model.lca.iters), ks=conv.get("ks"),
        budgets=settings["budgets"], batch_size=int(settings["batch_size"]),
        timing=TimingSettings(**conv["timing"]), examples=int(conv["examples"]["images"]),
        examples_iters=int(conv["examples"]["iters"]), name=name, show_progress=show_progress, device=device,
        baselines=build(BaselineSettings, conv.get("baselines"), "eval.convergence.baselines"))
