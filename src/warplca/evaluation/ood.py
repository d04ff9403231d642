"""Experiment 4 — out of distribution (README, "Experiments and reports").

A bundle is applied unchanged to other datasets, larger images and photo crops (:func:`photo_crops`);
missing datasets are skipped with a note, channels matched (:func:`match_channels`). Energies are
compared per pixel value (E / C·H·W), since image sizes differ.
"""

from __future__ import annotations

import inspect
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from warplca.data import DatasetNotFoundError, luminance
from warplca.data.natural import GRAY_SOURCES, load_photo
from warplca.evaluation.common import (
    METHODS,
    EvalModel,
    ExperimentResult,
    Figure,
    _plain,
    build_datamodule_from_config,
    clip_ks,
    describe_model,
    load_images,
)
from warplca.evaluation.convergence import match_sentence
from warplca.evaluation.curves import Curves, curve_rows, measure, row_metrics
from warplca.evaluation.experiments import EvalSession, evaluation
from warplca.evaluation.plots import plot_sets
from warplca.evaluation.report import fmt, markdown_table
from warplca.settings import Annotated, Checked, Doc, Ge

log = logging.getLogger(__name__)

__all__ = [
    "COMPARE_COLUMNS", "OODSource", "PHOTOS", "cold_warm_markdown", "cold_warm_rows", "load_source",
    "match_channels", "measure_ood", "ood_evaluation", "photo_crops",
]

COLUMNS = ["dataset", "size", "method", "k", "energy", "energy_norm", "psnr", "ssim", "l0", "l0_frac"]
#: the cold vs warm comparison (``<prefix>_cold_vs_warm.csv``)
COMPARE_COLUMNS = [
    "dataset", "size", "n_images", "k", "cold_energy", "warm_energy", "warm_le_cold", "warm_le_cold_frac",
    "cold_energy_norm", "warm_energy_norm", "cold_l0", "warm_l0", "start_guard_frac",
]
MATCH_KEYS = ("iterations_to_match", "matched_frac")
#: iteration counts the comparison always reports (plus the experiment's budgets)
COMPARE_KS = (0, 1, 10)
#: scikit-image's bundled grayscale photos of natural scenes: in no split of the RGB natural data (the
#: ``grayscale=true`` natural data adds them to its train split: not out of distribution for such a run)
PHOTOS = tuple(GRAY_SOURCES)


@dataclass
class OODSource:
    """One evaluation dataset: a datamodule config (``name``/``_target_`` + kwargs) and split, or ``photos``
    (:func:`photo_crops` kwargs but ``n``); ``n_images`` None: the experiment's default."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    split: str = "test"
    n_images: int | None = None
    photos: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> OODSource:
        """A source from its ``eval.ood.sources`` entry; ValueError names what is wrong."""
        d = _plain(cfg)
        if "name" not in d:
            raise ValueError(f"an OOD source needs a name, got {d}")
        if bool(d.get("data")) == bool(d.get("photos")):
            raise ValueError(f"OOD source {d['name']!r} needs either `data` (a datamodule config) or "
                             f"`photos` (photo crops), got {sorted(k for k in d if k in ('data', 'photos'))}")
        if d.get("photos"):
            known = set(inspect.signature(photo_crops).parameters) - {"n"}
            unknown = sorted(set(dict(d["photos"])) - known)
            if unknown:
                raise ValueError(f"OOD source {d['name']!r}: unknown `photos` keys {unknown}; known: "
                                 f"{sorted(known)}")
        return cls(name=str(d["name"]), data=dict(d.get("data") or {}), split=str(d.get("split", "test")),
                   n_images=d.get("n_images"), photos=dict(d["photos"]) if d.get("photos") else None)


def photo_crops(names: Sequence[str] = PHOTOS, crop_size: int = 32, n: int = 32, scale: float = 0.5,
                seed: int = 0, min_std: float = 0.02) -> Tensor:
    """``n`` deterministic ``crop_size`` crops (N, 3, c, c) in [0, 1] of bundled photos, round robin.

    Image i comes from ``names[i % len(names)]``, downscaled by ``scale`` (``data.natural.load_photo``).
    Each photo draws candidates from its own generator (``seed``, its name) and keeps those
    with pixel std ≥ ``min_std``, so its crops depend on neither ``n`` nor the other photos. A crop larger
    than a photo raises ValueError.
    """
    names = [str(p) for p in names]
    if not names:
        raise ValueError("photo_crops needs at least one photo name")
    c, n = int(crop_size), int(n)
    if c < 1 or n < 1:
        raise ValueError(f"crop_size and n must be >= 1, got crop_size={crop_size}, n={n}")
    per_photo: list[list[Tensor]] = []
    for i, name in enumerate(names):
        count = len(range(i, n, len(names)))
        photo = load_photo(name, scale)
        h, w = photo.shape[-2:]
        if c > min(h, w):
            raise ValueError(f"crop_size={c} is larger than photo {name!r} at scale {scale} ({h}×{w} px)")
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))
        kept: list[Tensor] = []
        for _ in range(200):
            if len(kept) >= count:
                break
            tops = torch.randint(0, h - c + 1, (64,), generator=gen).tolist()
            lefts = torch.randint(0, w - c + 1, (64,), generator=gen).tolist()
            crops = [photo[:, top : top + c, left : left + c] for top, left in zip(tops, lefts, strict=True)]
            kept += [crop for crop in crops if float(crop.std()) >= min_std]
        if len(kept) < count:
            raise ValueError(f"photo {name!r}: fewer than {count} {c}×{c} crops with pixel std ≥ {min_std}")
        per_photo.append(kept[:count])
    return torch.stack([per_photo[i % len(names)][i // len(names)] for i in range(n)]).contiguous()


def match_channels(images: Tensor, channels: int) -> tuple[Tensor, str | None]:
    """Replicate grey images to 3 channels or take the luminance of colour images; note what was done."""
    have = images.shape[1]
    if have == channels:
        return images, None
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous(), "grey images replicated to 3 channels"
    if have == 3 and channels == 1:
        return luminance(images), "colour images converted to luminance"
    raise ValueError(f"cannot feed {have}-channel images to a {channels}-channel model")


def load_source(source: OODSource, channels: int, default_n: int) -> tuple[Tensor | None, str | None]:
    """Images of a source (matched to ``channels``) and a note; (None, reason) when it is unavailable."""
    n = source.n_images or default_n
    try:
        if source.photos:
            images = photo_crops(**{**source.photos, "n": n})
        else:
            images = load_images(build_datamodule_from_config(source.data), source.split, n)
        return match_channels(images, channels)
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as exc:  # ValueError: e.g. a crop too large
        return None, f"skipped: {exc}"


def cold_warm_rows(curves: Mapping[str, Mapping[str, Curves]], ks: Sequence[int],
                   sizes: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Cold LCA vs WARP-LCA per image set and k ∈ ``ks`` (≤ T): mean energy (and per pixel value), mean
    ℓ0, warm ≤ cold on the means and per image, and the share of starts the start guard sent back."""
    rows = []
    for name, cond in curves.items():
        cold, warm = cond["cold"], cond["warm"]
        for k in sorted({int(k) for k in ks if 0 <= int(k) <= min(cold.total, warm.total)}):
            ce, we = cold.energy[k], warm.energy[k]
            rows.append({
                "dataset": name, "size": (sizes or {}).get(name, ""), "n_images": cold.n_images, "k": k,
                "cold_energy": float(ce.mean()), "warm_energy": float(we.mean()),
                "warm_le_cold": bool(we.mean() <= ce.mean()),
                "warm_le_cold_frac": float((we <= ce).double().mean()),
                "cold_energy_norm": float(ce.mean()) / cold.numel,
                "warm_energy_norm": float(we.mean()) / warm.numel,
                "cold_l0": float(cold.l0[k].mean()), "warm_l0": float(warm.l0[k].mean()),
                "start_guard_frac": warm.guard_frac,
            })
    return rows


def cold_warm_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`cold_warm_rows` as a markdown table (✓ where WARP-LCA's mean energy is ≤ cold LCA's)."""
    shown = [dict(r, le="✓" if r["warm_le_cold"] else "✗ (warm higher)",
                  frac=f"{100 * r['warm_le_cold_frac']:.0f}%") for r in rows]
    return markdown_table(
        shown, ["dataset", "size", "k", "cold_energy", "warm_energy", "le", "frac", "cold_l0", "warm_l0"],
        ["dataset", "size", "iterations", "energy cold", "energy warm", "warm ≤ cold", "images warm ≤ cold",
         "ℓ0 cold", "ℓ0 warm"])


def measure_ood(model: EvalModel, sources: Sequence[OODSource], *, iters: int = 1000,
                budgets: Sequence[int] = (1, 10, 100, 1000), n_images: int = 64, batch_size: int = 64,
                reference: tuple[str, Tensor] | None = None, prefix: str = "ood", show_progress: bool = True,
                device: torch.device | None = None) -> ExperimentResult:
    """Cold LCA vs WARP-LCA on each source (and the in-distribution ``reference`` images, if given).

    Files: ``<prefix>.csv`` (every checkpoint), ``<prefix>_table.csv`` (budgets), ``<prefix>.png``,
    ``<prefix>_cold_vs_warm.csv`` (:func:`cold_warm_rows` at k = 0, 1, 10 and the budgets). Metrics:
    ``<prefix>/<dataset>/<cold|warm>/<metric>@<k>``, ``…/warm_le_cold@<k>``, ``…/iterations_to_match``, …
    """
    total = int(iters)
    budgets = clip_ks(budgets, total)[1:]  # the budgets ≥ 1, T included
    notes: list[str] = []
    datasets: list[tuple[str, Tensor, str | None]] = [] if reference is None else [
        (reference[0], reference[1][:n_images], "in distribution (the training data's test split)")]
    for source in sources:
        images, note = load_source(source, model.dictionary.in_channels, n_images)
        if images is None:
            notes.append(f"`{source.name}`: {note}")
            log.warning("OOD source %s %s", source.name, note)
            continue
        datasets.append((source.name, images, note))

    curves: dict[str, dict[str, Curves]] = {}
    matches: dict[str, dict[str, Any]] = {}
    for name, images, _ in datasets:
        curves[name], matches[name] = measure(
            model, images, total, [*budgets, *COMPARE_KS], name=name, batch_size=batch_size, device=device,
            show_progress=show_progress)
    sizes = {name: f"{images.shape[-2]}×{images.shape[-1]}" for name, images, _ in datasets}
    compare = cold_warm_rows(curves, sorted({*COMPARE_KS, *budgets}), sizes)
    rows = [r for name in curves for r in curve_rows(curves[name], {"dataset": name, "size": sizes[name]})]
    table = [r for r in rows if r["k"] in budgets]
    p = prefix
    metrics = row_metrics(p, table, ("energy_norm", "psnr", "ssim", "l0_frac"), "dataset")
    for name, images, note in datasets:
        metrics.update({f"{p}/{name}/{key}": matches[name][key] for key in MATCH_KEYS})
        metrics[f"{p}/{name}/n_images"] = float(images.shape[0])
        if note:
            notes.append(f"`{name}` ({sizes[name]}, {images.shape[0]} images): {note}")
    for r in compare:
        name, k = r["dataset"], r["k"]
        metrics.update({f"{p}/{name}/{m}/{q}@{k}": r[f"{m}_{q}"] for m in METHODS for q in ("energy", "l0")})
        metrics[f"{p}/{name}/warm_le_cold@{k}"] = float(r["warm_le_cold"])
        metrics[f"{p}/{name}/start_guard_frac"] = r["start_guard_frac"]

    info = describe_model(model)
    title = f"Out of distribution — {info['threshold']} threshold, λ={fmt(info['lam'])}, T={total}"
    md = ["## Out of distribution", "", f"{title}. The bundle is applied unchanged (its own normalisation); "
          "energy per pixel value (E / C·H·W) makes image sizes comparable.", ""]
    figures: dict[str, Figure] = {}
    if curves:
        figures["plot"] = Figure(f"{p}.png", "out-of-distribution curves", lambda: plot_sets(
            curves, ["energy_norm", "psnr"], title, (12, 4.8)))
        shown = [dict(r, method=METHODS.get(r["method"], r["method"])) for r in table]
        guard = [f"{r['dataset']} {100 * r['start_guard_frac']:.0f}%"
                 for r in compare if r["k"] == 0 and not math.isnan(r["start_guard_frac"])]
        md += [
            markdown_table(
                shown, ["dataset", "size", "method", "k", "energy_norm", "psnr", "ssim", "l0_frac"],
                ["dataset", "size", "method", "iterations", "energy / value", "PSNR (dB)", "SSIM",
                 "ℓ0 fraction"]),
            *(f"- **{name}**: {match_sentence(m)}" for name, m in matches.items()),
            "", "### Cold LCA vs WARP-LCA per image set", "",
            "Mean energy ½‖x − Φa‖² + ΣP(a) and mean ℓ0 (active coefficients per image) after k iterations; "
            "warm ≤ cold on the means, and the share of images where it holds per image.",
            "",
            cold_warm_markdown(compare),
            *(["Start guard (WARP-LCA started cold because the predicted start's energy exceeded ½‖x‖²): "
               + ", ".join(guard) + " of the images."] if guard else []),
            "", figures["plot"].link,
        ]
    else:
        md.append("No dataset could be evaluated.")
    summary = [{"dataset": n, **{k: m[k] for k in MATCH_KEYS}} for n, m in matches.items()]
    return ExperimentResult.from_lines(
        prefix, md, notes, metrics=metrics, figures=figures,
        csv={f"{p}.csv": (COLUMNS, rows), f"{p}_table.csv": (COLUMNS, table),
             f"{p}_cold_vs_warm.csv": (COMPARE_COLUMNS, compare)},
        tables={f"{p}/curves": (COLUMNS, rows), f"{p}/cold_vs_warm": (COMPARE_COLUMNS, compare),
                f"{p}/iterations_to_match": (["dataset", *MATCH_KEYS], summary)})


def _photos(crop: int) -> dict[str, Any]:
    return {"names": list(GRAY_SOURCES), "crop_size": crop, "scale": 0.5, "seed": "${seed}"}


def _natural(crop: int) -> dict[str, Any]:
    return {"_target_": "warplca.data.NaturalDataModule", "crop_size": crop, "n_train": 8, "n_val": 8,
            "n_test": 64, "seed": "${seed}"}


def _on_disk(target: str, **extra: Any) -> dict[str, Any]:
    return {"_target_": target, "data_dir": "${paths.data_dir}", "download": False, "num_workers": 0, **extra}


@dataclass(frozen=True)
class OODSettings(Checked):
    """``eval.ood``: the image sets (``${…}`` resolved against the run's config), their image count and T,
    and whether the run's own split is shown as the in-distribution reference."""

    reference: Annotated[bool, Doc("the run's own split as the in-distribution row")] = True
    n_images: Annotated[int | None, Ge(1), Doc("images per set (null: eval.n_images)")] = 32
    iters: Annotated[int | None, Ge(1), Doc("T (null: the run's)")] = None
    sources: Annotated[Sequence[Mapping[str, Any]], Doc("name + data (a datamodule) or photos")] = (
        {"name": "natural_64", "data": _natural(64)}, {"name": "natural_96", "data": _natural(96)},
        {"name": "photos_32", "photos": _photos(32)}, {"name": "photos_64", "photos": _photos(64)},
        {"name": "photos_96", "photos": _photos(96)},
        {"name": "digits_rgb", "data": {"_target_": "warplca.data.DigitsDataModule", "rgb": True,
                                        "seed": "${seed}"}},
        {"name": "stl10", "data": _on_disk("warplca.data.STL10DataModule")},
        {"name": "pets", "data": _on_disk("warplca.data.PetsDataModule", image_size=64)})


@evaluation("ood", OODSettings)
def ood_evaluation(session: EvalSession) -> ExperimentResult:
    """``eval=ood``: experiment 4, the run's model on the sources of ``eval.ood.sources``."""
    conf = session.settings["ood"]
    sources = [OODSource.from_config(s) for s in conf["sources"] or []]
    n = int(conf["n_images"] or session.settings.get("n_images") or OODSettings.n_images)
    reference_images = session.images  # loads the run's data (and names it) first
    reference = ((f"{session.data_name or 'run data'} (in distribution)", reference_images)
                 if conf["reference"] else None)
    return measure_ood(session.model, sources, iters=session.total(conf.get("iters")), n_images=n,
                       budgets=session.settings["budgets"], reference=reference, **session.run_kwargs())
