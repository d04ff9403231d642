"""Shared pieces of the evaluations: models, data, devices, iteration grids and pixel metrics.

Experiments take any model with the WarpLCA interface (:class:`EvalModel`), so they are testable
without a trained bundle.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLE_NAME", "METHODS", "EvalModel", "ExperimentResult", "Figure", "batch_slices", "median_ms",
    "build_datamodule_from_config", "clip_ks", "describe_model", "find_bundle", "load_images", "load_model",
    "log_spaced_ks", "model_sentence", "normalize_ks", "pixel_quality", "progress",
    "resolve_device", "run_data_config", "synchronize", "to_pixels",
]

#: the file name of the WARP-LCA bundle inside a run directory
BUNDLE_NAME = "warp_lca.pt"

#: condition key -> label used in tables and legends
METHODS: dict[str, str] = {"cold": "LCA (cold)", "warm": "WARP-LCA"}


@dataclass
class Figure:
    """A PNG of an experiment: file name, alt text and ``draw()`` (builds the figure; the writer calls it)."""

    filename: str
    label: str
    draw: Callable[[], Any]

    @property
    def link(self) -> str:
        """The markdown image link to the file (the report section lives next to it)."""
        return f"![{self.label}]({self.filename})"


@dataclass
class ExperimentResult:
    """What an experiment measured, ready for :func:`warplca.evaluation.report.write_result`.

    ``metrics``: flat scalars; ``markdown``: its report.md section; ``csv``: file name -> (columns, rows);
    ``figures``: key -> :class:`Figure`; ``tables``: logger key -> (columns, rows) (wandb ``Table``);
    ``notes``: anything it skipped; ``files``: key or file name -> path, filled by the writer.
    """

    name: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    markdown: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[dict[str, Any]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    csv: dict[str, tuple[Sequence[str], list[dict[str, Any]]]] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)

    @classmethod
    def from_lines(cls: type[_R], name: str, md: Sequence[str], notes: Sequence[str] = (),
                   **fields: Any) -> _R:
        """A result whose ``markdown`` is the lines ``md`` plus, if there are ``notes``, a "Notes:" list."""
        if notes:
            md = [*md, "", "Notes:", *[f"- {n}" for n in notes]]
        return cls(name=name, markdown="\n".join(md) + "\n", notes=list(notes), **fields)


_R = TypeVar("_R", bound=ExperimentResult)


class EvalModel(Protocol):
    """What the evaluations need from a model (``warplca.bundle.WarpLCA`` satisfies it): the solver
    ``lca``, WARP-CNN states, pixels <-> coded space and ``model(x, iters, warm, trace)``."""

    lca: Any
    dictionary: Any

    def __call__(self, x: Tensor, iters: int | None = ..., warm: bool = ..., trace: bool = ...) -> Any: ...

    def predict_states(self, x: Tensor) -> Tensor: ...

    def preprocess(self, images: Tensor) -> Tensor: ...

    def postprocess(self, recon: Tensor, images: Tensor | None = None) -> Tensor: ...


# -- iteration grids ---------------------------------------------------------------------------------
def log_spaced_ks(total: int, mantissas: Iterable[int] = (1, 2, 3, 5)) -> list[int]:
    """0, the 1-2-3-5 decades up to ``total`` (powers of ten included) and ``total``: [0, 1, 2, …, T]."""
    total = int(total)
    if total < 0:
        raise ValueError(f"the iteration budget must be >= 0, got {total}")
    ks = {0, total}
    decade = 1
    while decade <= total:
        ks.update(m * decade for m in mantissas if m * decade <= total)
        decade *= 10
    return sorted(ks)


def normalize_ks(ks: Iterable[int] | None, total: int) -> list[int]:
    """Sorted unique checkpoints in [0, total] that always contain 0 and ``total``."""
    if ks is None:
        return log_spaced_ks(total)
    ks = [int(k) for k in ks]
    outside = [k for k in ks if not 0 <= k <= total]
    if outside:
        raise ValueError(f"checkpoint k={outside[0]} lies outside [0, {total}]")
    return clip_ks(ks, total)


def clip_ks(ks: Iterable[int], total: int) -> list[int]:
    """The checkpoints of ``ks`` inside [0, total] plus 0 and ``total``, sorted and unique."""
    return sorted({0, int(total), *(int(k) for k in ks if 0 <= int(k) <= total)})


# -- devices, progress ---------------------------------------------------------------------------------
def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing on GPUs measures nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(call: Callable[[], Any], n: int, repeats: int, max_seconds: float,
              device: torch.device) -> float:
    """Median wall-clock milliseconds per image (``n`` images) of ``call()``: up to ``repeats`` runs, fewer
    once they have used ``max_seconds`` (device-synchronised; the caller warms up)."""
    times: list[float] = []
    while len(times) < max(1, repeats):
        synchronize(device)
        t0 = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if sum(times) >= max_seconds:
            break
    return 1000.0 * statistics.median(times) / n


def progress(total: int, desc: str, enable: bool = True) -> Any:
    """A tqdm progress bar (disabled -> a no-op bar with the same ``update``/``close`` methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enable, leave=False, dynamic_ncols=True)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering range(n)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


# -- pixel metrics ------------------------------------------------------------------------------------
def to_pixels(model: EvalModel, recon: Tensor, images: Tensor) -> Tensor:
    """Reconstructions in the coded space -> [0, 1] pixels (postprocess with the coded ``images``)."""
    return model.postprocess(recon, images).clamp(0.0, 1.0)


def pixel_quality(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR and SSIM (B,) on [0, 1] pixels, ``data_range=1.0``; their means equal what
    :func:`warplca.metrics.reconstruction_metrics` accumulates."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred = pred.detach().to(torch.float32)
    target = target.detach().to(device=pred.device, dtype=torch.float32)
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    return psnr.reshape(-1).cpu(), ssim.reshape(-1).cpu()


# -- runs, bundles, data --------------------------------------------------------------------------------
def find_bundle(path: str | os.PathLike) -> Path:
    """A run directory (holding ``warp_lca.pt``) or the bundle file itself -> the bundle path."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / BUNDLE_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no WARP-LCA bundle here (expected {BUNDLE_NAME} in the run directory; "
                                "train one with `python train.py stages=[dictionary,targets,warp]`)")
    return p


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> EvalModel:
    """Load the WARP-LCA bundle of a run directory (or a ``.pt`` file) onto ``device``, in eval mode."""
    from warplca.bundle import WarpLCA

    return WarpLCA.load(find_bundle(path)).to(resolve_device(device)).eval()


def run_data_config(run_dir: str | os.PathLike | None, paths: Mapping[str, Any] | None = None,
                    seed: int = 0) -> tuple[dict[str, Any], str]:
    """The data config a training run used, resolved, and where it came from.

    Interpolations that only resolve inside the run's Hydra context are retried with ``paths`` and
    ``seed``; without a saved config, or if that fails too, the natural images are used (logged).
    """
    saved = Path(run_dir) / ".hydra" / "config.yaml" if run_dir is not None else None
    run_cfg = OmegaConf.load(saved) if saved is not None and saved.is_file() else None
    if run_cfg is not None and run_cfg.get("data") is not None:
        for retry in (False, True):
            cfg = OmegaConf.merge(run_cfg, {"paths": dict(paths or {}), "seed": seed}) if retry else run_cfg
            try:
                data = OmegaConf.to_container(cfg.data, resolve=True)
                return dict(data), f"{run_dir}/.hydra/config.yaml"  # type: ignore[arg-type]
            except Exception as exc:
                error = exc
        log.warning("cannot resolve the data config of %s (%s); using the natural images", run_dir, error)
    return {"name": "natural", "seed": int(seed)}, "default (natural)"


def _plain(cfg: Any) -> dict[str, Any]:
    """A (resolved) config node or mapping as a fresh plain dict."""
    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return dict(cfg)


def build_datamodule_from_config(data_cfg: Mapping[str, Any] | Any, **overrides: Any) -> Any:
    """A datamodule from a ``data`` config: ``_target_`` (instantiated) or ``name`` (+ constructor kwargs).

    Keys the constructor does not accept (documentation-only keys of a preset) are dropped (debug log).
    """
    from warplca.data import DATAMODULES

    cfg = _plain(data_cfg)  # a fresh dict
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    target = cfg.pop("_target_", None)
    if target is not None:
        import hydra.utils

        cls = hydra.utils.get_class(target)
    else:
        name = cfg.pop("name", None)
        if name not in DATAMODULES:
            raise ValueError(f"data config needs `_target_` or a `name` in {sorted(DATAMODULES)}, "
                             f"got {name!r}")
        cls = DATAMODULES[name]
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in cfg.items() if accepts_any or k in params}
    dropped = sorted(set(cfg) - set(kwargs))
    if dropped:
        log.debug("data config keys not used by %s: %s", cls.__name__, dropped)
    return cls(**kwargs)


def load_images(datamodule: Any, split: str = "test", limit: int | None = None) -> Tensor:
    """The first ``limit`` images ([0, 1], (N, C, H, W)) of a datamodule split."""
    return datamodule.tensor(split, limit)[0]


def model_sentence(model: EvalModel) -> str:
    """One line on the model for reports: dictionary geometry, threshold, λ, predictor size."""
    info = describe_model(model)
    meta = getattr(model, "meta", None) or {}
    k = info.get("dict_kernel_size", "?")
    text = (f"Model: {info.get('dict_n_atoms', '?')} atoms {info.get('dict_in_channels', '?')}×{k}×{k} "
            f"(stride {info.get('dict_stride', '?')}), {info['threshold']} threshold, λ = {info['lam']:g}")
    if "predictor_params" in info:
        text += f", WARP-CNN with {info['predictor_params']:,} parameters"
    if meta.get("target_iters"):
        solver = meta.get("target_solver") or "cold"
        name = solver.get("name", "?") if isinstance(solver, dict) else str(solver)
        kind = "λ-continuation LCA" if name == "continuation" else "cold-LCA"
        text += f" trained on {meta['target_iters']}-step {kind} states"
    if meta.get("dataset"):
        text += f" of `{meta['dataset']}`"
    return text + "."


def describe_model(model: EvalModel) -> dict[str, Any]:
    """Plain facts about a model for reports: threshold, λ, τ, dictionary geometry, predictor size."""
    lca, d = model.lca, model.dictionary
    settings = lca.settings() if hasattr(lca, "settings") else {}
    out: dict[str, Any] = {
        "threshold": settings.get("threshold", getattr(getattr(lca, "threshold", None), "name", "?")),
        "lam": settings.get("lam", getattr(lca, "lam", math.nan)),
        "tau": settings.get("tau", "?"),
    }
    if hasattr(d, "config"):
        out.update({f"dict_{k}": v for k, v in d.config().items()})
    predictor = getattr(model, "predictor", None)
    if isinstance(predictor, torch.nn.Module):
        out["predictor_params"] = sum(p.numel() for p in predictor.parameters())
    return out

