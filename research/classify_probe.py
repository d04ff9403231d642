"""Throwaway probe: digits dictionary + quick WARP-CNN + noisy classification with the three front ends.

Usage: python research/classify_probe.py --out /tmp/wl_probe/run --size 16 --atoms 32 --kernel 5 --lam 0.5
Stages are cached in --out (dictionary.pt, targets.pt, warp_lca.pt, rows_<fe>.pt).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from warplca import LCA, ConvDictionary
from warplca.bundle import WarpLCA
from warplca.data import DigitsDataModule
from warplca.evaluation.robustness import (
    robustness_conditions,
    robustness_markdown,
    save_robustness_plot,
    write_robustness_csv,
)
from warplca.frontends import build_frontend
from warplca.losses import laplacian_loss
from warplca.models import WarpCNN
from warplca.modules.noisy_classification import FrontEndDataModule, NoisyClassification

log = logging.getLogger("probe")


def learn_dictionary(xn: torch.Tensor, args: argparse.Namespace) -> ConvDictionary:
    """Alternate LCA inference (warm-started from a per-image state bank) and Adam steps on the atoms."""
    D = ConvDictionary(args.atoms, xn.shape[1], args.kernel, args.stride, seed=0)
    lca = LCA(D, lam=args.lam, tau="auto")
    bank = torch.zeros((xn.shape[0], *D.code_shape(*xn.shape[-2:])))
    opt = torch.optim.Adam([D.weight], lr=args.dict_lr)
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.dict_epochs):
        perm = torch.randperm(xn.shape[0], generator=g)
        tot = 0.0
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            x = xn[idx]
            res = lca(x, iters=args.dict_iters, u0=bank[idx])
            bank[idx] = res.u
            opt.zero_grad()
            loss = 0.5 * (x - D.decode(res.a, x.shape[-2:])).pow(2).flatten(1).sum(1).mean()
            loss.backward()
            opt.step()
            D.normalize_()
            tot += float(loss) * len(idx)
        l0 = float((res.a != 0).float().mean())
        log.info("dict epoch %d loss %.3f l0 %.4f", epoch, tot / xn.shape[0], l0)
    return D


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/wl_probe/run")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--atoms", type=int, default=32)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--dict-epochs", type=int, default=12)
    p.add_argument("--dict-iters", type=int, default=30)
    p.add_argument("--dict-lr", type=float, default=0.01)
    p.add_argument("--target-iters", type=int, default=500)
    p.add_argument("--warp-epochs", type=int, default=150)
    p.add_argument("--warp-width", type=int, default=64)
    p.add_argument("--warp-depth", type=int, default=3)
    p.add_argument("--cold-iters", type=int, default=500)
    p.add_argument("--warm-iters", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--frontends", default="pixels,warp_lca,lca")
    p.add_argument("--levels", default="4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--noise-aug", type=float, default=0.0, help="max σ of noise added to WARP-CNN inputs")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    dm = DigitsDataModule(image_size=args.size, batch_size=64)
    norm = dm.normalization
    x_tr, _ = dm.tensor("train")
    xn = norm.apply(x_tr)

    # 1. dictionary
    dpath = out / "dictionary.pt"
    if dpath.exists():
        D = ConvDictionary.load(dpath)
    else:
        t = time.time()
        D = learn_dictionary(xn, args)
        D.save(dpath)
        log.info("dictionary %.1fs", time.time() - t)
    lca = LCA(D, lam=args.lam, tau="auto")

    # 2. targets
    tpath = out / "targets.pt"
    if tpath.exists():
        u_star = torch.load(tpath)
    else:
        t = time.time()
        u_star = torch.cat([lca(xn[i : i + 256], iters=args.target_iters).u for i in range(0, len(xn), 256)])
        torch.save(u_star, tpath)
        active = float((lca.threshold(u_star) != 0).float().mean())
        log.info("targets %.1fs; active frac %.4f", time.time() - t, active)

    # 3. WARP-CNN
    wpath = out / "warp_lca.pt"
    if wpath.exists():
        bundle = WarpLCA.load(wpath)
    else:
        t = time.time()
        net = WarpCNN(1, args.atoms, args.stride, width=args.warp_width, depth=args.warp_depth)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = args.warp_epochs * ((len(xn) + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        g = torch.Generator().manual_seed(0)
        for epoch in range(args.warp_epochs):
            perm = torch.randperm(len(xn), generator=g)
            tot = 0.0
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                loss = laplacian_loss(net(xn[idx]), u_star[idx], args.lam, 3.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss) * len(idx)
            if epoch % 25 == 0 or epoch == args.warp_epochs - 1:
                log.info("warp epoch %d loss %.4f", epoch, tot / len(xn))
        bundle = WarpLCA(D, net, lca, norm)
        bundle.save(wpath)
        log.info("warp %.1fs", time.time() - t)
        # energy check on val
        x_va, _ = dm.tensor("val")
        xv = norm.apply(x_va)
        for it in (0, 5, 10, 20):
            e = bundle(xv, iters=it).energy.mean()
            log.info("val warm energy @%d: %.3f", it, float(e))
        for it in (20, 100, 500, 1000):
            log.info("val cold energy @%d: %.3f", it, float(bundle(xv, iters=it, warm=False).energy.mean()))

    # 4. classification
    nlev = int(args.levels)
    from warplca.data import DEFAULT_LEVELS

    levels = {k: v[1:] if nlev == 4 else v for k, v in DEFAULT_LEVELS.items()}
    conditions = robustness_conditions(levels)
    all_rows = []
    for kind in args.frontends.split(","):
        rpath = out / f"rows_{kind}.pt"
        if rpath.exists():
            all_rows += torch.load(rpath)
            continue
        t = time.time()
        pl.seed_everything(0, verbose=False)
        fe = build_frontend(kind, in_channels=1, dictionary=D, lca_settings=lca, bundle=bundle,
                            iters=args.cold_iters if kind == "lca" else args.warm_iters, normalization=norm)
        kw = {"width": args.width} if args.backbone == "small_cnn" else None
        module = NoisyClassification(fe, args.backbone, 10, image_size=args.size, conditions=conditions,
                                     backbone_kwargs=kw)
        fdm = FrontEndDataModule(dm, fe, conditions, batch_size=64, feature_batch_size=256)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, datamodule=fdm)
        tf = time.time() - t
        trainer.test(module, datamodule=fdm, verbose=False)
        rows = module.robustness_rows
        torch.save(rows, rpath)
        all_rows += rows
        log.info("%s: fit %.1fs (cache %.1fs) test %.1fs clean %.4f", kind, tf, fdm.cache_seconds,
                 time.time() - t - tf, rows[0]["accuracy"])
    write_robustness_csv(all_rows, out / "robustness.csv")
    save_robustness_plot(all_rows, out / "robustness.png")
    md = robustness_markdown(all_rows)
    (out / "robustness.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
