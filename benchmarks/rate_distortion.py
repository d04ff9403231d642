"""Rate–distortion of dictionaries: PSNR on [0, 1] pixels against active coefficients per image.

    python benchmarks/rate_distortion.py [--out benchmarks/results/rate_distortion] [--quick]
    python benchmarks/rate_distortion.py --dictionary mine=<run>/dictionary.pt

Every dictionary is coded with the project's hard-threshold LCA (τ = auto, ``--iters`` steps from a cold
start) on the natural test split (crops of coffee and rocket, never seen by any training), sweeping λ over
``--lams``. Dictionaries (each trained on the natural training split and cached in ``--out``):

* ``default``: the dictionary stage with the project's defaults (``python train.py stages=[dictionary]``);
* ``legacy``: the same stage with the settings the project had before the ``norm`` group (six training
  photos including astronomy/microscopy images, dataset-mean normalisation, 3 epochs of 30 LCA steps at
  lr 3e-3, no resampling, constant learning rate);
* ``random``: random unit-norm atoms of the default geometry;
* ``sporco``: sporco's ``ConvBPDNDictLearn`` (ADMM, consensus dictionary update) on the same training
  crops with its own convention — Tikhonov low-pass removed, ℓ1 penalty, stride 1 — 64 atoms 3×9×9;
* any ``--dictionary NAME=PATH`` given.

Each dictionary is coded under one common normalisation (``--norm``, default the project default
``image_mean``) so that what is kept outside the code is the same for all, and additionally under the
normalisation it was trained with. The table interpolates PSNR at 40, 80 and 150 active coefficients per
image (log-linear in the coefficient count); the JSON has every point. Each finished curve is cached in
``--out`` (keyed by the dictionary's fingerprint and the settings), so an interrupted run resumes.
Prints JSON, then the table; writes ``rate_distortion.json``, ``rate_distortion.md`` and
``rate_distortion.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from warplca import LCA, ConvDictionary, SparseCoder
from warplca.data import NaturalDataModule, Normalization
from warplca.lca import atom_usage, random_dictionary_like, used_atoms

#: overrides that recreate the dictionary stage as it was before the ``norm`` group
LEGACY_OVERRIDES = [
    "norm=dataset_mean", "lca.lam=0.5",
    "data.sources.train=[astronaut,hubble_deep_field,immunohistochemistry,retina,motorcycle_left,"
    "motorcycle_right]",
    "data.scale_jitter=[1.0]", "data.flip=false", "data.rot90=false",
    "model.dictionary.iters=30", "model.dictionary.optimizer=adam", "model.dictionary.lr=0.003",
    "model.dictionary.trainer.max_epochs=3",
    "model.dictionary.resample_every=0", "model.dictionary.lr_schedule=constant",
]
ANCHORS = (40, 80, 150)
MAX_L0 = 250.0


def train_stage(name: str, overrides: list[str], out: Path) -> Path:
    """Run the dictionary stage with ``overrides`` into ``out/name`` (skipped when already there)."""
    from warplca.config import compose_config
    from warplca.tasks.train import train

    run = out / name
    if not (run / "dictionary.pt").is_file():
        cfg = compose_config(["stages=[dictionary]", "logger=csv", *overrides], output_dir=run)
        started = time.perf_counter()
        train(cfg)
        print(f"[{name}] dictionary stage: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return run / "dictionary.pt"


def train_sporco(train_images: torch.Tensor, lam: float, iters: int, path: Path, seed: int = 0) -> Path:
    """sporco's ConvBPDNDictLearn on the crops (low-pass removed, ℓ1, stride 1); atoms saved to ``path``."""
    if path.is_file():
        return path
    from sporco import signal
    from sporco.dictlrn import cbpdndl

    images = train_images.permute(2, 3, 1, 0).double().numpy()  # (H, W, C, N), sporco's layout
    _, high = signal.tikhonov_filter(images, 5.0, 16)
    rng = np.random.default_rng(seed)
    d0 = rng.standard_normal((9, 9, images.shape[2], 64))
    opt = cbpdndl.ConvBPDNDictLearn.Options({
        "Verbose": False, "MaxMainIter": iters,
        "CBPDN": {"rho": 50.0 * lam + 0.5, "AutoRho": {"Enabled": True}},
        "CCMOD": {"rho": 10.0, "ZeroMean": True},
    }, dmethod="cns")
    started = time.perf_counter()
    learner = cbpdndl.ConvBPDNDictLearn(d0, high, lam, opt, dmethod="cns")
    atoms = np.asarray(learner.solve()).reshape(9, 9, images.shape[2], 64)
    print(f"[sporco] ConvBPDNDictLearn: {iters} iterations, {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    # (K, C, k, k); both synthesise by convolution (Φa = conv_transpose2d): the atoms carry over as they are
    weight = torch.from_numpy(atoms).permute(3, 2, 0, 1).float().contiguous()
    ConvDictionary.from_weights(weight, stride=1).save(path, source="sporco ConvBPDNDictLearn",
                                                       lam=lam, iters=iters)
    return path


def load(path: Path) -> tuple[ConvDictionary, Normalization | None]:
    """A saved dictionary and the normalisation saved with it (None for foreign ones)."""
    from warplca.lca.dictionary import FORMAT
    from warplca.serialization import load_checked

    payload = load_checked(path, FORMAT)
    norm = (payload.get("meta") or {}).get("normalization")
    return ConvDictionary.from_payload(payload), None if norm is None else Normalization.from_dict(norm)


@torch.no_grad()
def curve(dictionary: ConvDictionary, norm: Normalization, images: torch.Tensor, lams: list[float],
          iters: int) -> list[dict[str, float]]:
    """One rate–distortion point per λ: PSNR (mean over images), active coefficients per image, usage.

    λ runs from the largest down and stops once a point is past ``MAX_L0`` active coefficients: the
    rest of the curve lies outside the range the table reads.
    """
    points = []
    for lam in sorted(lams, reverse=True):
        coder = SparseCoder(dictionary, LCA(dictionary, threshold="hard", lam=lam, tau="auto", iters=iters),
                            norm)
        psnr, l0, usage = [], [], torch.zeros(dictionary.n_atoms, dtype=torch.float64)
        for i in range(0, len(images), 64):
            batch = images[i:i + 64]
            coded = coder.code(batch, warm=False)
            mse = (coded.pixels - batch).pow(2).flatten(1).mean(1).clamp_min(1e-12)
            psnr.append(10 * torch.log10(1.0 / mse))
            l0.append((coded.result.a != 0).flatten(1).sum(1).double())
            usage += atom_usage(coded.result.a)
        points.append({"lam": lam, "psnr": float(torch.cat(psnr).mean()), "l0": float(torch.cat(l0).mean()),
                       "atoms_used": used_atoms(usage)})
        if points[-1]["l0"] > MAX_L0:
            break
    return points


def at(points: list[dict[str, float]], l0: float) -> float | None:
    """PSNR interpolated at ``l0`` active coefficients (log-linear in l0); None outside the curve."""
    pts = sorted((p["l0"], p["psnr"]) for p in points if p["l0"] > 0)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= l0 <= x1:
            t = 0.0 if x1 == x0 else (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def base_psnr(norm: Normalization, images: torch.Tensor) -> float:
    """PSNR of what the normalisation keeps outside the code alone (zero active coefficients)."""
    pixels = norm.invert(torch.zeros_like(images), images).clamp(0, 1)
    mse = (pixels - images).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("common", f"all coded with norm={results['common_norm']}"), ("own", "each with its own norm")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, entry in results["dictionaries"].items():
            pts = sorted((p for p in entry[key]["points"] if p["l0"] > 0), key=lambda p: p["l0"])
            ax.plot([p["l0"] for p in pts], [p["psnr"] for p in pts], "o-", ms=3,
                    label=f"{name} ({entry[key]['norm']})")
        for anchor in ANCHORS:
            ax.axvline(anchor, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("active coefficients per 32×32 crop")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("PSNR (dB, [0, 1] pixels)")
    fig.suptitle(f"Rate–distortion on the natural test split (hard-threshold LCA, {results['iters']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    head = "| dictionary | norm | L = ‖Φ‖²_op | " + " | ".join(f"PSNR @ {a}" for a in ANCHORS) + \
        " | atoms used (λ at ~80 coeff.) |"
    lines = [head, "|---|---|---:|" + "---:|" * len(ANCHORS) + "---:|"]
    for key in ("common", "own"):
        for name, entry in results["dictionaries"].items():
            e = entry[key]
            if key == "own" and e["norm"] == results["common_norm"]:
                continue
            vals = [e["at"].get(str(a)) for a in ANCHORS]
            near = min(e["points"], key=lambda p: abs(math.log(max(p["l0"], 1e-3) / 80)))
            cells = " | ".join("—" if v is None else f"{v:.2f}" for v in vals)
            lines.append(f"| {name} | {e['norm']} | {entry['lipschitz']:.1f} | {cells} | "
                         f"{near['atoms_used']} of {entry['n_atoms']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rate_distortion"))
    parser.add_argument("--lams", type=float, nargs="+",
                        default=[0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.56, 0.8, 1.1, 1.6])
    parser.add_argument("--iters", type=int, default=500, help="LCA steps per code (cold start)")
    parser.add_argument("--n-test", type=int, default=64, help="test crops")
    parser.add_argument("--norm", default="image_mean", help="the common normalisation")
    parser.add_argument("--sporco-crops", type=int, default=160, help="training crops for sporco")
    parser.add_argument("--sporco-iters", type=int, default=60)
    parser.add_argument("--sporco-lam", type=float, default=0.1)
    parser.add_argument("--dictionary", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--skip", nargs="*", default=[], help="built-in dictionaries to leave out")
    parser.add_argument("--quick", action="store_true", help="few crops, λ values and steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lams, args.iters, args.n_test = [0.1, 0.2, 0.4], 50, 32
        args.sporco_crops, args.sporco_iters = 32, 5
    args.out.mkdir(parents=True, exist_ok=True)

    dm = NaturalDataModule(n_test=args.n_test)
    test_images, _ = dm.tensor("test")
    dictionaries: dict[str, Path] = {}
    if "default" not in args.skip:
        extra = ["model.dictionary.trainer.max_epochs=1", "data.n_train=256"] if args.quick else []
        dictionaries["default"] = train_stage("default", extra, args.out)
    if "legacy" not in args.skip:
        extra = ["model.dictionary.trainer.max_epochs=1", "data.n_train=256"] if args.quick else []
        dictionaries["legacy"] = train_stage("legacy", LEGACY_OVERRIDES + extra, args.out)
    if "sporco" not in args.skip:
        train_images, _ = NaturalDataModule(n_train=args.sporco_crops).tensor("train")
        dictionaries["sporco"] = train_sporco(train_images, args.sporco_lam, args.sporco_iters,
                                              args.out / "sporco_dictionary.pt")
    for item in args.dictionary:
        name, _, path = item.partition("=")
        dictionaries[name] = Path(path)

    loaded = {name: load(path) for name, path in dictionaries.items()}
    if "random" not in args.skip:
        reference = loaded.get("default", next(iter(loaded.values()), (None, None)))[0]
        reference = reference or ConvDictionary(n_atoms=64, in_channels=3, kernel_size=9, stride=2)
        loaded["random"] = (random_dictionary_like(reference, seed=1), None)

    mean = Normalization.fit(NaturalDataModule(n_train=256).tensor("train")[0]).mean
    common = Normalization(mean=mean, kind=args.norm)
    results: dict[str, Any] = {"iters": args.iters, "lams": args.lams, "n_test": len(test_images),
                               "common_norm": args.norm, "anchors": list(ANCHORS), "dictionaries": {},
                               "base_psnr": {}}
    sporco_norm = Normalization(mean=mean, kind="lowpass")
    for name, (dictionary, own) in loaded.items():
        own = own or (sporco_norm if name == "sporco" else common)
        entry: dict[str, Any] = {"lipschitz": dictionary.operator_norm(32), "n_atoms": dictionary.n_atoms,
                                 "stride": dictionary.stride}
        for key, norm in (("common", common), ("own", own)):
            if key == "own" and own.kind == common.kind:
                entry["own"] = entry["common"]
                continue
            started = time.perf_counter()
            cache_key = {"dictionary": dictionary.fingerprint(), "norm": norm.to_dict(), "lams": args.lams,
                         "iters": args.iters, "n_test": len(test_images)}
            cache = args.out / f"curve_{name}_{norm.kind}.json"
            cached = json.loads(cache.read_text()) if cache.is_file() else None
            if cached is not None and cached.get("key") == cache_key:
                pts = cached["points"]
            else:
                pts = curve(dictionary, norm, test_images, args.lams, args.iters)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps({"key": cache_key, "points": pts}))
                tmp.replace(cache)  # atomic: a killed run leaves no half-written curve
            entry[key] = {"norm": norm.kind, "points": pts,
                          "at": {str(a): at(pts, a) for a in ANCHORS}}
            results["base_psnr"][norm.kind] = base_psnr(norm, test_images)
            print(f"[{name} / {norm.kind}] {time.perf_counter() - started:.0f} s", file=sys.stderr)
        results["dictionaries"][name] = entry
    (args.out / "rate_distortion.json").write_text(json.dumps(results, indent=1))
    md = table(results)
    bases = ", ".join(f"{k} {v:.2f} dB" for k, v in results["base_psnr"].items())
    md += f"\n\nPSNR of the part kept outside the code alone (0 coefficients): {bases}.\n"
    (args.out / "rate_distortion.md").write_text(md)
    plot(results, args.out / "rate_distortion.png")
    print(json.dumps(results))
    print(md)


if __name__ == "__main__":
    main()
