"""``RunContext``: what a pipeline stage gets — the config, the run directory and builders.

One context per ``train.py`` invocation: it builds the datamodule once, gives each stage fresh loggers
and a Trainer checkpointing to ``checkpoints/<stage>/``, loads earlier stages' artifacts and merges
metrics into ``metrics.json``. Trainer keyword precedence (lowest first): ``model.<stage>.trainer`` <
the stage code's ``defaults`` < non-null keys of the ``trainer`` group < keyword overrides of the stage code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from warplca.callbacks import ensure_default_callbacks
from warplca.lca import LCA, ConvDictionary
from warplca.lca.dictionary import FORMAT as DICTIONARY_FORMAT
from warplca.serialization import BUNDLE_FILE, DICTIONARY_FILE, load_checked, merge_metrics
from warplca.settings import Annotated, Checked, Doc, Ge, OneOf
from warplca.tasks.utils import close_wandb, instantiate_callbacks, instantiate_loggers, to_container

log = logging.getLogger(__name__)

__all__ = ["RunContext", "RunSettings"]


@dataclass
class RunContext:
    """The run's config and directory plus lazily built, cached shared objects."""

    cfg: DictConfig
    run_dir: Path
    _datamodule: Any = field(default=None, init=False, repr=False)
    _dictionary: ConvDictionary | None = field(default=None, init=False, repr=False)
    _dictionary_meta: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).expanduser().resolve()

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunContext:
        """The context of a composed train config; the run directory is ``cfg.paths.output_dir``."""
        out = OmegaConf.select(cfg, "paths.output_dir")
        if out is None:
            raise ValueError("cfg.paths.output_dir is not set (compose the config with the paths group)")
        return cls(cfg=cfg, run_dir=Path(out))

    # -- the run directory ----------------------------------------------------------------------
    def artifact(self, name: str | os.PathLike) -> Path:
        """Path of an artifact in the run directory (``dictionary.pt``, ``targets/``, …)."""
        return self.run_dir / name

    @property
    def is_rank_zero(self) -> bool:
        """True on the process that writes files (global rank 0; always true without DDP)."""
        return rank_zero_only.rank == 0

    @property
    def force(self) -> bool:
        """``cfg.force``: redo done stages, ignore checkpoints."""
        return bool(self.cfg.get("force", RunSettings.force))

    def barrier(self) -> None:
        """Wait for all ranks when a process group is up (``strategy=ddp``); a no-op otherwise."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # -- data -----------------------------------------------------------------------------------
    @property
    def datamodule(self) -> Any:
        """The datamodule of ``cfg.data`` (instantiated once, then cached)."""
        if self._datamodule is None:
            if self.cfg.get("data") is None:
                raise ValueError("no data config: choose one with data=<name> (e.g. data=natural)")
            dm = instantiate(self.cfg.data, _convert_="all")  # plain lists and dicts, as typed
            norm = to_container(self.cfg.get("norm"))
            if norm:
                dm.configure_normalization(**norm)
            self._datamodule = dm
        return self._datamodule

    # -- loggers, callbacks, trainer ------------------------------------------------------------
    def loggers(self, stage: str) -> list[Logger]:
        """Fresh Lightning loggers of ``cfg.logger`` for ``stage`` (files under ``<logger>/<stage>/``)."""
        task = self.cfg.get("task_name", RunSettings.task_name)
        loggers = instantiate_loggers(self.cfg.get("logger"), version=stage,
                                      run_name=f"{self.run_dir.name}/{stage}",
                                      run_group=f"{task}/{self.run_dir.name}")
        hparams = OmegaConf.to_container(  # the resolved run config without the hydra node
            OmegaConf.masked_copy(self.cfg, [k for k in self.cfg if k != "hydra"]), resolve=True)
        for lg in loggers:
            lg.log_hyperparams(hparams)
        return loggers

    def trainer_kwargs(self, stage: str, defaults: dict[str, Any] | None = None,
                       **overrides: Any) -> dict[str, Any]:
        """Trainer keyword arguments for ``stage`` (see the module doc for the precedence)."""
        kwargs: dict[str, Any] = to_container(OmegaConf.select(self.cfg, f"model.{stage}.trainer")) or {}
        kwargs.update(defaults or {})
        base = to_container(self.cfg.get("trainer")) or {}
        kwargs.update({k: v for k, v in base.items() if v is not None})
        kwargs.update(overrides)
        kwargs.setdefault("_target_", "pytorch_lightning.Trainer")
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        return kwargs

    def checkpoint_dir(self, stage: str) -> Path:
        """``<run_dir>/checkpoints/<stage>``."""
        return self.run_dir / "checkpoints" / stage

    def resume_checkpoint(self, stage: str) -> Path | None:
        """``checkpoints/<stage>/last.ckpt`` if it exists, unless ``resume=false`` or ``force=true`` ask for a
        fresh start; a truncated or foreign file raises ValueError."""
        from warplca.runtime import check_checkpoint

        path = self.checkpoint_dir(stage) / "last.ckpt"
        if self.force or not self.cfg.get("resume", RunSettings.resume) or not path.is_file():
            return None
        path = check_checkpoint(path)
        log.info("resuming the %s stage from %s", stage, path)
        return path

    def trainer(self, stage: str, name: str | None = None, defaults: dict[str, Any] | None = None,
                **overrides: Any) -> pl.Trainer:
        """A Trainer for ``stage`` (whose ``model.<stage>.trainer`` applies) with fresh loggers (``logger=``
        replaces them), the configured callbacks plus ``callbacks=[...]``, and a ``ModelCheckpoint``
        (``save_last``) in :meth:`checkpoint_dir`; ``name`` (default ``stage``) names the checkpoint folder
        and the loggers' version, for a stage that trains more than once (fine-tune, one per front end)."""
        from pytorch_lightning.callbacks import ModelCheckpoint

        name = name or stage
        kwargs = self.trainer_kwargs(stage, defaults, **overrides)
        ckpt_dir = str(self.checkpoint_dir(name))
        callbacks = instantiate_callbacks(self.cfg.get("callbacks"), checkpoint_dir=ckpt_dir)
        callbacks += list(kwargs.pop("callbacks", None) or [])
        logger = kwargs.pop("logger", None)
        # the NaN/Inf guard and the DDP epoch-metrics sync even with callbacks=none
        ensure_default_callbacks(callbacks, skip_nonfinite=bool(self.cfg.get("skip_nonfinite_batches")))
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        if kwargs.get("enable_checkpointing", True) and not has_ckpt:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
        if logger is None:
            logger = self.loggers(name) or False
        if not logger:  # LearningRateMonitor refuses to run without a logger
            callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
        return instantiate(OmegaConf.create(kwargs), callbacks=callbacks, logger=logger, _convert_="all")

    def finish_loggers(self) -> None:
        """Close what a stage's loggers left open (the wandb run), so the next stage starts clean."""
        close_wandb()

    # -- metrics --------------------------------------------------------------------------------
    def log_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` into ``metrics.json`` under ``stage`` (rank 0 only; see
        :func:`~warplca.serialization.merge_metrics`: atomic, tensors as numbers, NaN as null)."""
        if self.is_rank_zero and metrics:
            merge_metrics(self.run_dir, metrics, section=stage)

    # -- artifacts of earlier stages ------------------------------------------------------------
    def _given_or_artifact(self, key: str, name: str) -> Path:
        given = self.cfg.get(key)
        return Path(given).expanduser() if given else self.artifact(name)

    def dictionary_file(self) -> Path:
        """``cfg.dictionary_path`` when given, else ``<run_dir>/dictionary.pt``."""
        return self._given_or_artifact("dictionary_path", DICTIONARY_FILE)

    def bundle_file(self) -> Path:
        """The WARP-LCA bundle: ``cfg.warp_path`` when given, else ``<run_dir>/warp_lca.pt``."""
        return self._given_or_artifact("warp_path", BUNDLE_FILE)

    def set_dictionary(self, dictionary: ConvDictionary, meta: dict[str, Any] | None = None) -> None:
        """Hand a freshly trained dictionary (and its save meta) to later stages of this run."""
        self._dictionary = dictionary
        self._dictionary_meta = dict(meta or {})

    def dictionary(self) -> ConvDictionary:
        """The run's dictionary: in memory if trained in this run, else read from :meth:`dictionary_file`."""
        if self._dictionary is None:
            path = self.dictionary_file()
            if not path.is_file():
                hint = ("check dictionary_path" if self.cfg.get("dictionary_path") else
                        "run the dictionary stage first (stages=[dictionary,...]) "
                        "or pass dictionary_path=<file>")
                raise FileNotFoundError(f"no dictionary at {path}: {hint}")
            payload = load_checked(path, DICTIONARY_FORMAT)
            self._dictionary = ConvDictionary.from_payload(payload)
            self._dictionary_meta = dict(payload.get("meta") or {})
            log.info("loaded dictionary %s from %s", self._dictionary.extra_repr(), path)
        return self._dictionary

    def normalization(self) -> Any:
        """The normalisation the dictionary codes in: its meta's, else the datamodule's (fitted on train)."""
        from warplca.data import Normalization

        if self._dictionary is not None or self.dictionary_file().is_file():
            self.dictionary()  # loads its meta too
            norm = (self._dictionary_meta or {}).get("normalization")
            if norm is not None:
                return Normalization.from_dict(norm)
            log.warning("dictionary %s has no normalization in its meta; using the datamodule's",
                        self.dictionary_file())
        return self.datamodule.normalization

    def lca_settings(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments of :class:`warplca.LCA` from ``cfg.lca`` (checked by the config validation;
        :class:`warplca.LCA` checks them again when built)."""
        return {**(to_container(self.cfg.get("lca")) or {}), **overrides}

    def lca(self, dictionary: ConvDictionary | None = None, **overrides: Any) -> LCA:
        """An :class:`warplca.LCA` on ``dictionary`` (default: the run's) with the ``lca`` settings."""
        settings = self.lca_settings(**overrides)
        try:
            return LCA(dictionary if dictionary is not None else self.dictionary(), **settings)
        except ValueError as exc:
            raise ValueError(f"invalid lca config {settings}: {exc}") from exc

    def coding(self) -> tuple[ConvDictionary, LCA, Any]:
        """The run's dictionary, an :class:`warplca.LCA` on it and the normalisation it codes in."""
        dictionary = self.dictionary()
        return dictionary, self.lca(dictionary), self.normalization()

    def stage_config(self, stage: str) -> DictConfig | None:
        """``cfg.model.<stage>`` without its ``trainer`` key (the LightningModule's own config)."""
        node = OmegaConf.select(self.cfg, f"model.{stage}")
        if node is None:
            return None
        return OmegaConf.masked_copy(node, [k for k in node if k != "trainer"])  # type: ignore[union-attr]

    def module(self, stage: str, **kwargs: Any) -> pl.LightningModule:
        """Instantiate ``cfg.model.<stage>`` (minus ``trainer``) with the objects in ``kwargs``."""
        node = self.stage_config(stage)
        if node is None or "_target_" not in node:
            raise ValueError(f"cfg.model.{stage} has no _target_ (choose a model@model.{stage} config)")
        # objects go to the partial, not through instantiate (Hydra would turn dataclasses into configs)
        return instantiate(node, _convert_="all", _partial_=True)(**kwargs)


def _stage_names() -> tuple[str, ...]:
    from warplca.tasks.stages import STAGE_ORDER  # the registry imports this module

    return STAGE_ORDER


@dataclass(frozen=True)
class RunSettings(Checked):
    """The top-level keys of a train config (``conf/train.yaml``; the groups are their own nodes)."""

    task_name: Annotated[str, Doc("names the output folders and logger runs")] = "train"
    stages: Annotated[Sequence[str] | str, OneOf(_stage_names, "stage"),
                      Doc("run in pipeline order")] = ("dictionary", "targets", "warp", "report")
    seed: Annotated[int | None, Ge(0)] = 0
    force: Annotated[bool, Doc("redo stages whose artifact exists")] = False
    resume: Annotated[bool, Doc("continue a stage from checkpoints/<stage>/last.ckpt")] = True
    dictionary_path: Annotated[str | None, Doc("use this dictionary.pt instead of training one")] = None
    warp_path: Annotated[str | None, Doc("use this warp_lca.pt instead of training one")] = None
    run_dir: Annotated[str, Doc("the run directory; an existing one resumes there")] = (
        "outputs/${task_name}/${now:%Y-%m-%d_%H-%M-%S}")
    optimized_metric: Annotated[str | None, Doc("the flat metric train.py returns to a sweeper")] = None
    skip_nonfinite_batches: Annotated[bool, Doc("skip a NaN/Inf batch with a warning")] = False
    print_metrics: Annotated[bool, Doc("end with the table of every metric")] = True
    progress: Annotated[bool, Doc("progress bars of the evaluation and study stages")] = True
