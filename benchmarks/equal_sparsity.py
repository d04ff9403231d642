"""λ of other thresholds at equal sparsity: the λ at which cold LCA's active coefficients after T steps
match the hard threshold's (the run's λ), on val crops — so that thresholds compare at equal sparsity,
not at equal λ.

    python benchmarks/equal_sparsity.py --run <main run> [--thresholds soft cel0 half] [--images 64]

Uses the run's bundle (dictionary, normalisation, hard-threshold λ) and its data config's val split
(never the test split the reports measure). Bisection on log λ until the mean ℓ0 is within ``--tol``
(relative) of the target. Prints JSON, then a table, and the training command of each threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from warplca.evaluation.common import load_model  # noqa: E402
from warplca.lca import LCA  # noqa: E402


def mean_l0(model: Any, x: torch.Tensor, threshold: str, lam: float, iters: int) -> float:
    """Mean active coefficients per image of cold LCA with ``threshold`` at ``lam`` after ``iters``."""
    settings = {**model.lca.settings(), "threshold": threshold, "lam": float(lam)}
    with torch.no_grad():
        a = LCA(model.dictionary, **settings)(x, iters=iters).a
    return float((a != 0).flatten(1).sum(1).double().mean())


def calibrate(model: Any, x: torch.Tensor, threshold: str, target: float, iters: int, tol: float,
              lo: float, hi: float, max_steps: int = 30) -> dict[str, Any]:
    """Bisection on log λ (ℓ0 falls as λ grows) to ``target`` active coefficients."""
    steps = []
    l_lo, l_hi = mean_l0(model, x, threshold, lo, iters), mean_l0(model, x, threshold, hi, iters)
    steps += [(lo, l_lo), (hi, l_hi)]
    if not l_hi <= target <= l_lo:
        raise ValueError(f"{threshold}: target ℓ0 {target:.1f} outside [{l_hi:.1f}, {l_lo:.1f}] for λ in "
                         f"[{lo}, {hi}]: widen --range")
    lam, l0 = lo, l_lo
    for _ in range(max_steps):
        lam = math.sqrt(lo * hi)
        l0 = mean_l0(model, x, threshold, lam, iters)
        steps.append((lam, l0))
        if abs(l0 - target) <= tol * target:
            break
        lo, hi = (lam, hi) if l0 > target else (lo, lam)
    return {"threshold": threshold, "lam": lam, "l0": l0, "target_l0": target, "evaluations": len(steps),
            "path": steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the main run directory (its warp_lca.pt)")
    parser.add_argument("--thresholds", nargs="+", default=["soft", "cel0", "half"])
    parser.add_argument("--images", type=int, default=64, help="val crops")
    parser.add_argument("--iters", type=int, default=None, help="T (default: the bundle's)")
    parser.add_argument("--tol", type=float, default=0.01, help="relative ℓ0 tolerance")
    parser.add_argument("--range", type=float, nargs=2, default=(0.005, 2.0), help="λ bracket")
    args = parser.parse_args(argv)

    from warplca.data import NaturalDataModule

    model = load_model(args.run)
    iters = int(args.iters or model.lca.iters)
    images = NaturalDataModule().tensor("val")[0][: args.images]
    x = model.preprocess(images)
    start = time.perf_counter()
    target = mean_l0(model, x, model.lca.threshold.name, model.lca.lam, iters)
    rows = [calibrate(model, x, t, target, iters, args.tol, *args.range) for t in args.thresholds]
    out = {"run": str(args.run), "reference": {"threshold": model.lca.threshold.name, "lam": model.lca.lam,
                                               "l0": target}, "iters": iters, "images": int(x.shape[0]),
           "seconds": round(time.perf_counter() - start, 1), "thresholds": rows}
    print(json.dumps(out, indent=1))
    print(f"\n| threshold | λ | cold ℓ0 @ {iters} (val) |\n|---|---:|---:|")
    print(f"| {model.lca.threshold.name} (reference) | {model.lca.lam:g} | {target:.1f} |")
    for r in rows:
        print(f"| {r['threshold']} | {r['lam']:.4g} | {r['l0']:.1f} |")
    print()
    for r in rows:
        print(f"python train.py experiment=thresholds_{r['threshold']} lca.lam={r['lam']:.4g} "
              f"dictionary_path={args.run}/dictionary.pt")
    return out


if __name__ == "__main__":
    main()
