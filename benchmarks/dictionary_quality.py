"""Is a learned dictionary worth learning? Learned vs random unit-norm atoms at the same λ and budget.

    python benchmarks/dictionary_quality.py <run_dir>/dictionary.pt [--iters 30 100 1000] [--seeds 3]

Codes the natural test split (the data config saved with the dictionary) with cold LCA at each budget,
using the LCA settings saved with the dictionary (λ, threshold, τ), and compares with random unit-norm
dictionaries of the same geometry (mean over ``--seeds``): PSNR / SSIM on the [0, 1] pixel scale,
active coefficients per image and energy.
"""

from __future__ import annotations

import argparse
import time

from warplca import LCA
from warplca.data import DATAMODULES, Normalization
from warplca.lca import random_dictionary_like
from warplca.lca.dictionary import FORMAT, ConvDictionary
from warplca.metrics import EnergyMetric, SparsityMetric, reconstruction_metrics
from warplca.serialization import load_checked


def measure(dictionary: ConvDictionary, settings: dict, norm: Normalization, images, iters: int) -> dict:
    lca = LCA(dictionary, **settings, iters=iters)
    rec, sparsity, energy = reconstruction_metrics(), SparsityMetric(), EnergyMetric()
    for i in range(0, len(images), 64):
        x = images[i:i + 64]
        res = lca(norm.apply(x))
        rec.update(norm.invert(res.recon).clamp(0, 1), x)
        sparsity.update(res.a)
        energy.update(res.energy, x[0].numel())
    return {k: float(v) for k, v in {**rec.compute(), **sparsity.compute(), **energy.compute()}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dictionary", help="a dictionary.pt written by the dictionary stage")
    parser.add_argument("--iters", type=int, nargs="+", default=[30, 100, 1000])
    parser.add_argument("--seeds", type=int, default=3, help="random dictionaries to average")
    args = parser.parse_args()

    payload = load_checked(args.dictionary, FORMAT)
    learned = ConvDictionary.from_payload(payload)
    meta = payload["meta"]
    norm = Normalization.from_dict(meta["normalization"])
    data = dict(meta["data"])
    name = next(k for k, cls in DATAMODULES.items() if data.pop("_target_", "").endswith(cls.__name__))
    images, _ = DATAMODULES[name](**data).tensor("test")
    settings = {k: v for k, v in meta["lca"].items() if k != "iters"}
    print(f"{name} test split: {len(images)} images; dictionary {learned.extra_repr()}; "
          f"threshold={settings['threshold']} λ={settings['lam']} τ={settings['tau']}")
    for iters in args.iters:
        start = time.perf_counter()
        ours = measure(learned, settings, norm, images, iters)
        runs = [measure(random_dictionary_like(learned, seed=s), settings, norm, images, iters)
                for s in range(args.seeds)]
        rand = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(f"iters={iters:5d}  learned: PSNR {ours['psnr']:6.2f} dB  SSIM {ours['ssim']:.3f}  "
              f"l0/img {ours['l0_per_image']:7.1f}  E {ours['energy']:8.2f}   random (mean of {args.seeds}): "
              f"PSNR {rand['psnr']:6.2f} dB  SSIM {rand['ssim']:.3f}  l0/img {rand['l0_per_image']:7.1f}  "
              f"E {rand['energy']:8.2f}   gain {ours['psnr'] - rand['psnr']:+.2f} dB  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
