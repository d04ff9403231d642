"""Throughput of building a state-target cache, and what CIFAR-10 (50 000 images × 1000 steps) would cost.

The ``targets`` stage codes every training image with cold LCA for ``target_iters`` steps and writes the
states into a resumable, memory-mapped cache (:mod:`warplca.data.target_cache`). This script builds such
a cache for N images × T steps with the real builder (Lightning's predict loop, chunk files, fsync) and
separately times the bare LCA compute on the same images, so the cost splits into

* per image-iteration (the solver): ``c_iter = t_compute / (N · T)``
* per image (loading, normalising, writing, fsync, the predict loop): ``c_image = (t_build − t_compute) / N``

and extrapolates ``t(N', T') ≈ N' · (c_image + T' · c_iter)`` to CIFAR-10 (50 000 × 1000 by default;
``--target-n`` / ``--target-iters``) on this device, and per device for ``--devices`` processes
(the build shards its chunks across DDP ranks; assuming linear scaling).

Images are the embedded natural crops (32×32 RGB, the CIFAR geometry; ``--size`` for others) and the
dictionary is random unit-norm atoms of the CIFAR setting (64 × 3×9×9, stride 2) — the cost does not
depend on what the atoms look like. Prints a table (stderr) and a JSON report (stdout or ``--json``).

    python benchmarks/cache_throughput.py --n 256 --iters 100                 # CPU, a minute or two
    python benchmarks/cache_throughput.py --device cuda --n 4096 --iters 1000  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(n: int, size: int, seed: int) -> torch.utils.data.Dataset:
    """N deterministic natural crops (the embedded dataset), as a map-style dataset of (image, label)."""
    from warplca.data import NaturalDataModule

    dm = NaturalDataModule(batch_size=256, crop_size=size, n_train=n, n_val=8, n_test=8, seed=seed)
    return dm.split_dataset("train")


def time_compute(ds: Any, lca: Any, iters: int, batch: int, device: torch.device, norm: Any) -> float:
    """Seconds of bare cold LCA (T steps) over all images, in batches, data already on the device."""
    from torch.utils.data import DataLoader

    xs = [norm.apply(x).to(device) for x, _ in DataLoader(ds, batch_size=batch)]
    lca(xs[0][:2], iters=2)  # warm-up (operator norm, allocator, kernels)
    sync(device)
    t0 = time.perf_counter()
    for x in xs:
        lca(x, iters=iters)
    sync(device)
    return time.perf_counter() - t0


def time_build(ds: Any, dictionary: Any, lca: Any, iters: int, norm: Any, batch: int, chunk: int,
               device: torch.device, devices: int, workdir: Path) -> float:
    """Seconds of a full cache build (predict loop, chunk files, fsync) on ``devices`` processes."""
    import pytorch_lightning as pl

    from warplca.modules.target_builder import build_target_cache

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    kwargs: dict[str, Any] = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **kwargs)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_target_cache(workdir / "cache", ds, dictionary, lca, iters, norm, dataset_name="natural",
                           split="train", chunk_size=chunk, batch_size=batch, trainer=trainer)
    return time.perf_counter() - t0


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="images to cache (default 256)")
    p.add_argument("--iters", type=int, default=100, help="LCA steps per target, T (default 100)")
    p.add_argument("--batch-size", type=int, default=128, help="LCA batch within a chunk")
    p.add_argument("--chunk-size", type=int, default=128, help="images per chunk (the resume unit)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<n>")
    p.add_argument("--devices", type=int, default=1, help="processes for the build (ddp_spawn when > 1)")
    p.add_argument("--size", type=int, default=32, help="image side (32: CIFAR)")
    p.add_argument("--atoms", type=int, default=64)
    p.add_argument("--kernel", type=int, default=9)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--target-n", type=int, default=50_000, help="extrapolate to this many images")
    p.add_argument("--target-iters", type=int, default=1000, help="… and this many steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the JSON report here (default: stdout)")
    args = p.parse_args(argv)
    if min(args.n, args.iters, args.batch_size, args.chunk_size, args.devices) < 1:
        raise SystemExit("--n, --iters, --batch-size, --chunk-size and --devices must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from warplca.data import Normalization
    from warplca.lca import LCA, ConvDictionary

    device = resolve_device(args.device)
    log(f"device {device}, {torch.get_num_threads()} threads; {args.n} images {args.size}×{args.size} × "
        f"{args.iters} steps; dictionary {args.atoms} × 3×{args.kernel}×{args.kernel}, stride {args.stride}")
    ds = images(args.n, args.size, args.seed)
    norm = Normalization(mean=(0.5, 0.5, 0.5))
    dictionary = ConvDictionary(args.atoms, 3, args.kernel, args.stride, seed=args.seed).to(device)
    dictionary.requires_grad_(False)
    lca = LCA(dictionary, threshold="hard", lam=args.lam, tau="auto")

    t_compute = time_compute(ds, lca, args.iters, args.batch_size, device, norm)
    log(f"bare LCA: {t_compute:.2f} s")
    with tempfile.TemporaryDirectory(prefix="warplca_cache_bench_") as tmp:
        cpu_dict = dictionary.cpu() if args.devices > 1 and device.type == "cpu" else dictionary
        t_build = time_build(ds, cpu_dict, LCA(cpu_dict, threshold="hard", lam=args.lam, tau="auto"),
                             args.iters, norm, args.batch_size, args.chunk_size, device, args.devices,
                             Path(tmp))
        size_bytes = (Path(tmp) / "cache" / "states.npy").stat().st_size
    log(f"cache build: {t_build:.2f} s")

    n, t = args.n, args.iters
    c_iter = t_compute / (n * t)
    c_image = max(0.0, t_build * args.devices - t_compute) / n  # process-seconds of overhead per image
    target = args.target_n * (c_image + args.target_iters * c_iter) / args.devices
    bytes_per_image = size_bytes / n
    report = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "devices": args.devices,
        "n": n, "iters": t, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
        "geometry": {"atoms": args.atoms, "channels": 3, "kernel": args.kernel, "stride": args.stride,
                     "size": args.size},
        "build_s": t_build,
        "compute_s": t_compute,
        "images_per_s": n / t_build,
        "image_iters_per_s": n * t / t_build,
        "s_per_image_iter": c_iter,
        "overhead_s_per_image": c_image,
        "overhead_fraction": 1.0 - t_compute / max(t_build * args.devices, 1e-12),
        "cache_bytes_per_image": bytes_per_image,
        "extrapolation": {"n": args.target_n, "iters": args.target_iters, "seconds": target,
                          "human": fmt_time(target),
                          "cache_gb": bytes_per_image * args.target_n / 1e9},
        "torch": torch.__version__,
    }
    rows = [
        ("build (predict loop, files, fsync)", f"{t_build:.2f} s", f"{n / t_build:.1f} img/s"),
        ("bare LCA compute", f"{t_compute:.2f} s", f"{n * t / t_compute:.0f} img·it/s"),
        ("per image-iteration", f"{c_iter * 1e6:.2f} µs", ""),
        ("overhead per image", f"{c_image * 1e3:.2f} ms",
         f"{100 * report['overhead_fraction']:.0f} % of build"),
        (f"extrapolated {args.target_n} × {args.target_iters}", fmt_time(target),
         f"{report['extrapolation']['cache_gb']:.2f} GB cache"),
    ]
    width = max(len(r[0]) for r in rows)
    log("")
    for name, a, b in rows:
        log(f"  {name:<{width}}  {a:>12}  {b}")
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        log(f"\nJSON report: {args.json}")
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
