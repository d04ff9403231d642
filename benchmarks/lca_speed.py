"""Speed of warplca's convolutional LCA against textbook and Gram-kernel loops, GEMM and sporco.

Everything is measured in one process, on one device, with medians over repeats:

* ``ours`` / ``ours+trace``: :class:`warplca.LCA` (polyphase backend), trace off / on.
* ``plain``: the textbook reconstruct-then-encode loop written here —
  ``u ← u + η(conv2d(x − conv_transpose2d(a)) + a − u)``.
* ``gram``: the lateral-inhibition form of lca-pytorch, written here — G = Φ⋆Φ on the code grid
  (conv2d of the atoms with themselves at the stride), ``u ← u + η(b − (G∗a − a) − u)``.
* ``gemm``: a 2048×2048 fp32 matmul, the device's practical peak for dense work.

Reported per method: ms per iteration, image-iterations per second and effective GFLOP/s with a
nominal 2·(2·K·C·k²·H'·W') flops per image-iteration (decode + encode MACs × 2), also as a fraction
of the GEMM rate. Then: wall time for soft-threshold LCA (circular, stride 1) to reach the ℓ1 objective
of sporco's ADMM after 500 iterations within 0.1 %, against sporco's own time; and the peak memory of
1000 vs 100 iterations (process RSS on CPU, measured in subprocesses; allocator peak on CUDA).

Run ``python benchmarks/lca_speed.py --quick`` for a short run; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from warplca.lca import LCA, ConvDictionary


@dataclass(frozen=True)
class Setting:
    """One benchmark geometry."""

    name: str
    n_atoms: int
    channels: int
    kernel: int
    stride: int
    size: int
    batch: int
    threshold: str
    lam: float

    def macs_per_image_iter(self) -> int:
        """Decode + encode multiply-adds for one image and one LCA step: 2·K·C·k²·H'·W'."""
        side = math.ceil(self.size / self.stride)
        return 2 * self.n_atoms * self.channels * self.kernel**2 * side * side


SETTINGS = (
    Setting("cifar", 64, 3, 9, 2, 32, 64, "hard", 0.5),
    Setting("gray", 32, 1, 7, 1, 32, 64, "hard", 0.5),
)


# -- utilities ---------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the clock of every timing: wall time (default) or this process's CPU time (``--clock cpu``, for
#: a machine shared with other jobs; equal to wall time on an idle machine with ``--threads 1``).
CLOCK: Callable[[], float] = time.perf_counter


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median time of ``fn`` in seconds on :data:`CLOCK` (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = CLOCK()
        fn()
        sync(device)
        times.append(CLOCK() - start)
    return statistics.median(times)


@contextlib.contextmanager
def sporco_threads(n: int) -> Iterator[None]:
    """Give sporco ``n`` threads: its pyFFTW transforms and numpy's BLAS / OpenMP pools."""
    import sporco.fft

    saved = getattr(sporco.fft, "pyfftw_threads", None)
    if saved is not None:
        sporco.fft.pyfftw_threads = n
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - optional
            yield
        else:
            with threadpool_limits(n):
                yield
    finally:
        if saved is not None:
            sporco.fft.pyfftw_threads = saved


def gemm_gflops(device: torch.device, repeats: int, n: int = 2048) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    seconds = median_time(lambda: torch.mm(a, b, out=out), device, repeats, warmup=2)
    return 2 * n**3 / seconds / 1e9


# -- the baselines, written here ----------------------------------------------------------------------
def threshold_fn(name: str, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "hard":
        return lambda u: F.hardshrink(u, lam)
    if name == "soft":
        return lambda u: F.softshrink(u, lam)
    raise ValueError(name)


def plain_lca(weight: torch.Tensor, stride: int, x: torch.Tensor, eta: float, iters: int,
              thr: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Textbook LCA: reconstruct with conv_transpose2d, encode the residual with conv2d."""
    k = weight.shape[-1]
    pad = (k - 1) // 2
    hc, wc = math.ceil(x.shape[-2] / stride), math.ceil(x.shape[-1] / stride)
    out_pad = (x.shape[-2] - 1 - (hc - 1) * stride, x.shape[-1] - 1 - (wc - 1) * stride)
    u = torch.zeros(x.shape[0], weight.shape[0], hc, wc, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        a = thr(u)
        recon = F.conv_transpose2d(a, weight, stride=stride, padding=pad, output_padding=out_pad)
        u = u + eta * (F.conv2d(x - recon, weight, stride=stride, padding=pad) + a - u)
    return u


def gram_kernel(weight: torch.Tensor, stride: int) -> tuple[torch.Tensor, int]:
    """Gram kernel G of ΦᵀΦ on the code grid, for code offsets |δ| ≤ D = ⌈(k−1)/s⌉.

    G[m, n, D + δ] = ⟨Φ_m at code position i, Φ_n at i + δ⟩ = Σ_t Φ_n[t]·Φ_m[t + s·δ], which is
    conv2d(input=Φ, weight=Φ, padding=s·D, stride=s)[m, n, D + δ]; then ΦᵀΦa = conv2d(a, G,
    padding=D) away from the image borders (checked in :func:`check_baselines`).
    """
    k = weight.shape[-1]
    reach = math.ceil((k - 1) / stride)
    gram = F.conv2d(weight, weight, padding=reach * stride, stride=stride)  # (K, K, 2D+1, 2D+1)
    return gram.contiguous(), reach


def gram_lca(weight: torch.Tensor, stride: int, x: torch.Tensor, eta: float, iters: int,
             thr: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """lca-pytorch's form: drive b = Φᵀx once, then lateral inhibition (G∗a − a) every step."""
    k = weight.shape[-1]
    pad = (k - 1) // 2
    gram, reach = gram_kernel(weight, stride)
    b = F.conv2d(x, weight, stride=stride, padding=pad)
    u = torch.zeros_like(b)
    for _ in range(iters):
        a = thr(u)
        inhibition = F.conv2d(a, gram, padding=reach) - a
        u = u + eta * (b - inhibition - u)
    return u


def check_baselines(device: torch.device) -> dict[str, float]:
    """The hand-written loops compute LCA: plain equals ours; gram equals it away from the borders."""
    s = Setting("check", 6, 2, 5, 2, 40, 2, "hard", 0.05)
    d = ConvDictionary(s.n_atoms, s.channels, s.kernel, s.stride, seed=3).double().to(device)
    x = torch.randn(s.batch, s.channels, s.size, s.size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0)).to(device)
    lca = LCA(d, threshold=s.threshold, lam=s.lam, tau="auto")
    ours = lca(x, iters=3)
    eta = 1.0 / ours.tau
    thr = threshold_fn(s.threshold, s.lam)
    w = d.weight.detach()
    plain = plain_lca(w, s.stride, x, eta, 3, thr)
    gram = gram_lca(w, s.stride, x, eta, 3, thr)
    # Border effects (atoms cut by the image edge, ignored by G) spread by the Gram reach per step.
    reach = math.ceil((s.kernel - 1) / s.stride)
    margin = 3 * reach + math.ceil(s.kernel / s.stride)
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    assert bool((ours.a[inner] != 0).any()), "check problem too sparse to test the inhibition"
    err_plain = float((plain - ours.u).abs().max())
    err_gram = float((gram[inner] - ours.u[inner]).abs().max())
    if err_plain > 1e-9 or err_gram > 1e-9:
        raise AssertionError(f"baseline loops disagree with LCA: plain {err_plain:.2e}, gram {err_gram:.2e}")
    return {"plain_max_abs_err": err_plain, "gram_interior_max_abs_err": err_gram}


# -- per-iteration speed ---------------------------------------------------------------------------------
def bench_setting(s: Setting, device: torch.device, dtype: torch.dtype, iters: int, repeats: int,
                  gemm: float) -> dict[str, Any]:
    d = ConvDictionary(s.n_atoms, s.channels, s.kernel, s.stride, seed=0).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(s.batch, s.channels, s.size, s.size, generator=gen, dtype=dtype) - 0.5).to(device)
    lca = LCA(d, threshold=s.threshold, lam=s.lam, tau="auto", backend="polyphase")
    tau = lca.resolve_tau(s.size, s.size)
    eta = 1.0 / tau
    thr = threshold_fn(s.threshold, s.lam)
    w = d.weight.detach()
    # The Gram form is 5–25× slower per step: fewer steps keep its share of the run bounded (the
    # time per step does not depend on the count; its one-off Gram kernel is included).
    gram_iters = max(5, iters // 5)
    methods: dict[str, tuple[int, Callable[[], object]]] = {
        "ours+trace": (iters, lambda: lca(x, iters=iters, trace=True)),
        "ours": (iters, lambda: lca(x, iters=iters)),
        "plain": (iters, lambda: plain_lca(w, s.stride, x, eta, iters, thr)),
        "gram": (gram_iters, lambda: gram_lca(w, s.stride, x, eta, gram_iters, thr)),
    }
    flops = 2 * s.macs_per_image_iter() * s.batch
    rows: dict[str, dict[str, float]] = {}
    for name, (steps, fn) in methods.items():
        seconds = median_time(fn, device, repeats) / steps
        gflops = flops / seconds / 1e9
        rows[name] = {"ms_per_iter": seconds * 1e3, "image_iters_per_s": s.batch / seconds,
                      "gflops": gflops, "frac_of_gemm": gflops / gemm, "iters": steps}
        log(f"  {s.name:6s} {name:11s} {seconds * 1e3:8.2f} ms/iter")
    for name in ("ours+trace", "ours"):
        rows[name]["speedup_vs_plain"] = rows["plain"]["ms_per_iter"] / rows[name]["ms_per_iter"]
        rows[name]["speedup_vs_gram"] = rows["gram"]["ms_per_iter"] / rows[name]["ms_per_iter"]
    return {"setting": asdict(s), "tau": tau, "iters": iters, "repeats": repeats, "methods": rows}


# -- against sporco --------------------------------------------------------------------------------------
def sporco_images(n: int, size: int) -> np.ndarray:
    """n zero-mean grayscale size×size crops in [0, 1] of scikit-image's bundled photographs."""
    from skimage import color, data

    sources = [data.camera(), color.rgb2gray(data.astronaut()) * 255, data.moon(),
               color.rgb2gray(data.coffee()) * 255]
    crops = []
    rng = np.random.default_rng(0)
    while len(crops) < n:
        img = np.asarray(sources[len(crops) % len(sources)], dtype=np.float64) / 255.0
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(img[y : y + size, x : x + size])
    out = np.stack(crops)
    return out - out.mean(axis=(1, 2), keepdims=True)


def bench_sporco(device: torch.device, threads: int, admm_iters: int = 500, n_images: int = 16,
                 size: int = 32, n_atoms: int = 32, kernel: int = 7, lam: float = 0.1,
                 rel: float = 1e-3, max_lca_iters: int = 20000, chunk: int = 250) -> dict[str, Any]:
    try:
        from sporco.admm import cbpdn
    except ImportError:
        return {"skipped": "sporco is not installed (pip install sporco)"}
    images = sporco_images(n_images, size)
    d64 = ConvDictionary(n_atoms, 1, kernel, 1, padding_mode="circular", seed=0).double()
    filters = d64.weight.detach().numpy()[:, 0].transpose(1, 2, 0).copy()
    signals = images.transpose(1, 2, 0).copy()

    def run_sporco() -> tuple[float, float]:
        opt = cbpdn.ConvBPDN.Options({"Verbose": False, "MaxMainIter": admm_iters, "RelStopTol": 0.0,
                                      "AutoRho": {"Enabled": True}})
        start = CLOCK()
        solver = cbpdn.ConvBPDN(filters, signals, lam, opt, dimK=1)
        code = solver.solve()
        seconds = CLOCK() - start
        recon = np.asarray(solver.reconstruct(code)).reshape(signals.shape)
        return 0.5 * float(np.sum((recon - signals) ** 2)) + lam * float(np.abs(code).sum()), seconds

    with sporco_threads(threads):
        target, sporco_s = run_sporco()
        log(f"  sporco ADMM {admm_iters} it: objective {target:.6f} in {sporco_s:.2f} s")
        sporco_s = min(sporco_s, run_sporco()[1])

    x64 = torch.from_numpy(images[:, None].copy())
    lca64 = LCA(d64, threshold="soft", lam=lam, tau="auto")
    result: dict[str, Any] = {"sporco_admm_iters": admm_iters, "sporco_objective": target,
                              "sporco_seconds": sporco_s, "n_images": n_images, "size": size,
                              "n_atoms": n_atoms, "kernel": kernel, "lam": lam, "rel": rel}
    for dtype in (torch.float32, torch.float64):
        d = ConvDictionary.from_weights(d64.weight.detach().to(dtype), padding_mode="circular").to(device)
        x = x64.to(device=device, dtype=dtype)
        # 1. the first iteration count that reaches the target, from the energy trace, in chunks
        #    (a warm restart from the last state continues the same trajectory)
        lca = LCA(d, threshold="soft", lam=lam, tau="auto")
        needed, done, u = -1, 0, None
        while done < max_lca_iters and needed < 0:
            probe = lca(x, iters=chunk, u0=u, trace=True)
            energies = probe.trace["energy"].double().sum(1).cpu()
            hits = torch.nonzero(energies <= target * (1 + rel * 0.9)).flatten()
            if len(hits):
                needed = done + int(hits[0])
            done, u = done + chunk, probe.u
        if needed < 0:
            result[str(dtype).split(".")[-1]] = {"reached": False, "iters": max_lca_iters}
            continue

        # 2. time a fresh solve of exactly that many steps (dictionary, τ by Lanczos, the loop)
        def solve(n: int = needed, d: ConvDictionary = d, x: torch.Tensor = x) -> torch.Tensor:
            fresh = ConvDictionary.from_weights(d.weight.detach(), padding_mode="circular")
            return LCA(fresh, threshold="soft", lam=lam, tau="auto")(x, iters=n).a

        seconds = median_time(solve, device, repeats=3)
        a = solve()
        objective = float(lca64.energy(x64, a.double().cpu()).sum())
        result[str(dtype).split(".")[-1]] = {
            "reached": True, "iters": needed, "seconds": seconds, "objective": objective,
            "rel_gap": objective / target - 1, "speedup_vs_sporco": sporco_s / seconds}
        log(f"  LCA soft {dtype}: {needed} it, {seconds:.2f} s, objective {objective:.6f} "
            f"({objective / target - 1:+.2e})")
    return result


# -- memory ------------------------------------------------------------------------------------------------
_CHILD = r"""
import json, resource, sys, torch
from warplca.lca import LCA, ConvDictionary
iters, trace, threads = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
torch.set_num_threads(threads)
d = ConvDictionary(64, 3, 9, 2, seed=0)
x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5
lca = LCA(d, threshold="hard", lam=0.5, tau="auto")
lca(x, iters=5, trace=trace)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lca(x, iters=iters, trace=trace)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def bench_memory(device: torch.device, threads: int, short: int = 100, long: int = 1000) -> dict[str, Any]:
    """Peak memory of a long vs a short run: it must not grow with the number of iterations."""
    out: dict[str, Any] = {"setting": "cifar", "short_iters": short, "long_iters": long}
    if device.type == "cuda":
        d = ConvDictionary(64, 3, 9, 2, seed=0).to(device)
        x = torch.rand(64, 3, 32, 32, device=device) - 0.5
        lca = LCA(d, threshold="hard", lam=0.5, tau="auto")
        for trace in (False, True):
            peaks = []
            for iters in (short, long):
                lca(x, iters=5, trace=trace)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                lca(x, iters=iters, trace=trace)
                torch.cuda.synchronize(device)
                peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
            out["trace" if trace else "no_trace"] = {"short_mib": peaks[0], "long_mib": peaks[1],
                                                     "method": "torch.cuda.max_memory_allocated"}
        return out
    for trace in (False, True):
        peaks = []
        for iters in (short, long):
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(iters), str(int(trace)), str(threads)],
                                  capture_output=True, text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks.append({"peak_mib": rec["after_kib"] / 1024,
                          "growth_mib": (rec["after_kib"] - rec["before_kib"]) / 1024})
        out["trace" if trace else "no_trace"] = {
            "short_peak_mib": peaks[0]["peak_mib"], "long_peak_mib": peaks[1]["peak_mib"],
            "short_growth_mib": peaks[0]["growth_mib"], "long_growth_mib": peaks[1]["growth_mib"],
            "method": "ru_maxrss in a subprocess (after a 5-step warm-up)"}
    return out


# -- report ------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"device: {env['device_name']} · torch {env['torch']} · threads {env['threads']} · "
             f"dtype {env['dtype']} · {env['clock']} clock · GEMM 2048² fp32: {report['gemm_gflops']:.1f} "
             f"GFLOP/s", ""]
    if report["speed"]:
        lines.append("| setting | method | ms/iter | image-iter/s | GFLOP/s | % of GEMM | vs plain "
                     "| vs gram |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for res in report["speed"]:
        for name, row in res["methods"].items():
            vs_plain = f"{row['speedup_vs_plain']:.2f}×" if "speedup_vs_plain" in row else ""
            vs_gram = f"{row['speedup_vs_gram']:.2f}×" if "speedup_vs_gram" in row else ""
            lines.append(f"| {res['setting']['name']} | {name} | {row['ms_per_iter']:.2f} | "
                         f"{row['image_iters_per_s']:.0f} | {row['gflops']:.1f} | "
                         f"{100 * row['frac_of_gemm']:.1f} | {vs_plain} | {vs_gram} |")
    sp = report.get("sporco")
    if sp is not None:
        lines.append("")
        if "skipped" in sp:
            lines.append(f"sporco comparison skipped: {sp['skipped']}")
        else:
            lines.append(f"Soft LCA (circular, stride 1; {sp['n_images']} images {sp['size']}², "
                         f"{sp['n_atoms']} atoms {sp['kernel']}², λ={sp['lam']}) to within "
                         f"{100 * sp['rel']:.1f} % of sporco ADMM's {sp['sporco_admm_iters']}-iteration "
                         f"objective {sp['sporco_objective']:.5f}:")
            lines.append("")
            lines.append("| solver | iterations | seconds | objective gap | speedup vs sporco |")
            lines.append("|---|---:|---:|---:|---:|")
            lines.append(f"| sporco ADMM | {sp['sporco_admm_iters']} | {sp['sporco_seconds']:.2f} | 0 "
                         f"| 1.00× |")
            for key in ("float32", "float64"):
                row = sp.get(key, {})
                if row.get("reached"):
                    lines.append(f"| LCA {key} | {row['iters']} | {row['seconds']:.2f} | "
                                 f"{row['rel_gap']:+.1e} | {row['speedup_vs_sporco']:.2f}× |")
                elif key in sp:
                    lines.append(f"| LCA {key} | not reached | | | |")
    mem = report.get("memory")
    if mem is not None:
        lines.append("")
        lines.append(f"| memory (cifar) | {mem['short_iters']} iterations | {mem['long_iters']} iterations |")
        lines.append("|---|---:|---:|")
        for key in ("no_trace", "trace"):
            row = mem[key]
            if "short_peak_mib" in row:
                lines.append(f"| {key} peak RSS / growth (MiB) | {row['short_peak_mib']:.0f} / "
                             f"{row['short_growth_mib']:.1f} | {row['long_peak_mib']:.0f} / "
                             f"{row['long_growth_mib']:.1f} |")
            else:
                lines.append(f"| {key} allocator peak (MiB) | {row['short_mib']:.1f} | "
                             f"{row['long_mib']:.1f} |")
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations and repeats (a few minutes on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--iters", type=int, default=None, help="LCA steps per timed run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch / BLAS threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time for a busy shared machine "
                             "(use with --threads 1)")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                        choices=[s.name for s in SETTINGS])
    parser.add_argument("--skip-speed", action="store_true", help="skip the per-iteration comparison")
    parser.add_argument("--skip-sporco", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default=None, help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    global CLOCK
    if args.clock == "cpu":
        if device.type == "cuda":
            raise SystemExit("--clock cpu measures host time only; use the wall clock on CUDA")
        CLOCK = time.process_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (20 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 7)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           (platform.processor() or platform.machine()), "cpus": os.cpu_count(), "threads": threads,
           "dtype": args.dtype, "quick": args.quick, "clock": args.clock,
           "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    log(f"warplca LCA benchmark on {env['device_name']} ({threads} threads), {iters} iterations × {repeats}")
    report: dict[str, Any] = {"env": env, "baseline_check": check_baselines(device)}
    report["gemm_gflops"] = gemm_gflops(device, repeats=max(3, repeats))
    log(f"  GEMM 2048² fp32: {report['gemm_gflops']:.1f} GFLOP/s")
    report["speed"] = [] if args.skip_speed else [
        bench_setting(s, device, dtype, iters, repeats, report["gemm_gflops"])
        for s in SETTINGS if s.name in args.settings]
    if not args.skip_sporco:
        report["sporco"] = bench_sporco(device, threads, admm_iters=500)
    if not args.skip_memory:
        report["memory"] = bench_memory(device, threads, short=100, long=300 if args.quick else 1000)
    table = markdown(report)
    print(table)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    else:
        print()
        print(text)
    return report


if __name__ == "__main__":
    main()
