"""Stage ``dictionary``: learn the atoms on the configured data and save ``dictionary.pt``.

Trains :class:`~warplca.modules.dictionary_learning.DictionaryLearning` (resumable), tests it against a
random unit-norm dictionary of the same geometry at the same λ and LCA budget (``random/test/*``,
``test/psnr_gain_db``) and writes ``dictionary.pt`` (with its meta), ``atoms.png`` and
``reconstructions.png``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from warplca.coder import SparseCoder
from warplca.lca import LCA, ConvDictionary, atom_usage, random_dictionary_like, used_atoms
from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.plotting import atom_grid, image_grid, save_png
from warplca.serialization import DICTIONARY_FILE
from warplca.tasks.context import RunContext

log = logging.getLogger(__name__)

ARTIFACT = DICTIONARY_FILE

__all__ = ["ARTIFACT", "build_dictionary", "evaluate_dictionary", "run"]


def build_dictionary(ctx: RunContext) -> ConvDictionary:
    """The initial (random) dictionary of ``cfg.dictionary`` for the data's channel count."""
    conf = ctx.cfg.get("dictionary")
    if conf is None:
        raise ValueError("no dictionary config: choose one with dictionary=<name> (cifar, small, tiny)")
    channels = ctx.datamodule.channels
    dictionary = instantiate(conf, in_channels=channels) if "_target_" in conf else ConvDictionary(
        in_channels=channels, **OmegaConf.to_container(conf, resolve=True))  # type: ignore[arg-type]
    if not isinstance(dictionary, ConvDictionary):
        raise ValueError(f"cfg.dictionary must build a ConvDictionary, got {type(dictionary).__name__}")
    return dictionary


@torch.no_grad()
def evaluate_dictionary(dictionary: ConvDictionary, lca_settings: dict[str, Any], normalization: Any,
                        loader: Any, iters: int, max_batches: int | None = None) -> dict[str, float]:
    """PSNR/SSIM (pixel scale), sparsity, energy and atom usage of LCA codes of ``loader``'s images
    (``atoms_used``: atoms with at least a twentieth of a uniform share of the activations)."""
    coder = SparseCoder(dictionary, LCA(dictionary, **{**lca_settings, "iters": iters}), normalization)
    recon_m, sparsity, energy = reconstruction_metrics(), SparsityMetric(), EnergyMetric()
    device = dictionary.weight.device
    usage = torch.zeros(dictionary.n_atoms, dtype=torch.float64)
    for batch in itertools.islice(loader, max_batches):
        images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        coded = coder.code(images, warm=False)
        recon_m.update(coded.pixels, images)
        sparsity.update(coded.result.a)
        energy.update(coded.result.energy, images[0].numel())
        usage += atom_usage(coded.result.a).cpu()
    out = {**recon_m.compute(), **sparsity.compute(), **energy.compute()}
    return {**{k: float(v) for k, v in out.items()}, "atoms_used": float(used_atoms(usage))}


def _test_batches(trainer: Any, available: int) -> int | None:
    """How many test batches the trainer's debug settings allow (fast_dev_run, limit_test_batches)."""
    if trainer.fast_dev_run:
        return int(trainer.fast_dev_run)
    limit = trainer.limit_test_batches
    if isinstance(limit, int):
        return limit
    if isinstance(limit, float) and limit < 1.0:
        return max(1, math.ceil(limit * available))
    return None


def run(ctx: RunContext) -> dict[str, float]:
    """Train, test, compare with a random dictionary, save ``dictionary.pt``; returns test metrics."""
    dm = ctx.datamodule
    normalization = dm.normalization
    dictionary = build_dictionary(ctx)
    lca_settings = ctx.lca_settings()
    ctx.lca(dictionary)  # validate λ, τ, … before any training
    module = ctx.module("dictionary", dictionary=dictionary, lca_settings=lca_settings,
                        normalization=normalization)
    initial = dictionary.weight.detach().clone()

    ckpt = ctx.resume_checkpoint("dictionary")
    trainer = ctx.trainer("dictionary")
    started = time.perf_counter()
    epoch_before = trainer.current_epoch
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        if ckpt is None:
            raise
        raise RuntimeError(f"could not resume the dictionary stage from {ckpt} (written with another "
                           f"config?): {exc}. Pass force=true or resume=false to train afresh") from exc

    fit_seconds = time.perf_counter() - started
    # Test outside Lightning, learned and random alike: one code path for every strategy (a second
    # ddp_spawn launch for trainer.test would cost a process start and trips the CSV logger).
    root = trainer.strategy.root_device
    device = root if root.type == "cuda" else torch.device("cpu")
    learned = module.dictionary.to(device).normalize_()
    learned.weight.requires_grad_(False)
    iters = int(module.test_iters)
    loader = dm.test_dataloader()
    max_batches = _test_batches(trainer, len(loader))
    scores = evaluate_dictionary(learned, lca_settings, normalization, loader, iters, max_batches)
    random = random_dictionary_like(learned, seed=int(ctx.cfg.get("seed") or 0) + 1)
    baseline = evaluate_dictionary(random, lca_settings, normalization, loader, iters, max_batches)
    metrics: dict[str, float] = {f"test/{k}": v for k, v in scores.items()}
    metrics.update({f"random/test/{k}": v for k, v in baseline.items()})
    metrics["test/psnr_gain_db"] = scores["psnr"] - baseline["psnr"]
    if getattr(trainer.strategy, "_start_method", "popen") == "popen":  # live loggers (not a spawn copy)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
    learned = learned.cpu()
    preview = next(iter(loader))[0][:16]  # one test batch: the image size for L, and the figure below
    height, width = (int(v) for v in preview.shape[-2:])
    metrics.update({
        "test_iters": float(iters), "epochs": float(trainer.current_epoch),
        "global_step": float(trainer.global_step),
        "atom_change": float((learned.weight - initial.cpu()).flatten(1).norm(dim=1).mean()),
        "lipschitz": float(learned.operator_norm(height, width)), "fit_time_s": fit_seconds,
        "epoch_time_s": fit_seconds / max(1, trainer.current_epoch - epoch_before),
        "atoms_resampled": float(module.resampled_total)})

    meta = {"normalization": normalization.to_dict(),
            "data": OmegaConf.to_container(ctx.cfg.data, resolve=True), "lca": dict(lca_settings),
            "train": {"iters": int(module.iters), "test_iters": iters, "lr": float(module.lr),
                      "epochs": int(trainer.current_epoch), "global_step": int(trainer.global_step)},
            "metrics": dict(metrics)}
    if ctx.is_rank_zero:
        path = learned.save(ctx.artifact(ARTIFACT), **meta)
        save_png(atom_grid(learned.weight), ctx.artifact("atoms.png"), upscale=4)
        coder = SparseCoder(learned, LCA(learned, **{**lca_settings, "iters": iters}), normalization)
        recon = coder.code(preview, warm=False).pixels
        save_png(image_grid(torch.stack([preview, recon], 1).flatten(0, 1), ncol=8),
                 ctx.artifact("reconstructions.png"), upscale=2)
        log.info("saved %s: test PSNR %.2f dB (random dictionary %.2f dB), %.1f active/image (random %.1f) "
                 "after %d LCA steps; %d of %d atoms used, L = %.1f, %.1f s per epoch", path, scores["psnr"],
                 baseline["psnr"], scores["l0_per_image"], baseline["l0_per_image"], iters,
                 scores["atoms_used"], learned.n_atoms, metrics["lipschitz"], metrics["epoch_time_s"])
    ctx.set_dictionary(learned, meta)
    return metrics
