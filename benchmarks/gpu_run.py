"""One prepared GPU run: the main job on ``trainer=gpu`` and the ``natural_full`` and ``natural_large``
target caches, each timed, their figures, tables and logs gathered in one folder.

    python benchmarks/gpu_run.py --out $OUT              # on a GPU machine (budget: < 10 min on one H100)
    python benchmarks/gpu_run.py --out /tmp/dry --dry-run  # the same jobs on the CPU at tiny sizes

Prints one JSON object (job -> seconds, return code, run directory) and a table; a job that fails does not
stop the others (its log is in the folder). ``--jobs`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: job name -> train.py overrides (the device is added by --dry-run / the default)
JOBS: dict[str, list[str]] = {
    "main": [],
    "natural_full_targets": ["experiment=natural_full", "stages=[dictionary,targets]"],
    "natural_large_targets": ["experiment=natural_large", "stages=[dictionary,targets]"],
}
#: what --dry-run adds: the CPU and sizes that finish in seconds
TINY = ["trainer=cpu", "data.n_train=64", "data.n_val=16", "data.n_test=16", "dictionary=tiny",
        "model.dictionary.trainer.max_epochs=1", "model.warp.epochs=1", "model.warp.finetune.epochs=1",
        "targets.iters=10", "targets.chunk_size=32", "lca.iters=10", "eval.n_images=4",
        "eval.budgets=[1,10]", "eval.convergence.timing.enabled=false", "eval.convergence.examples.images=2"]
KEEP = ("*.png", "*.md", "*.csv", "metrics.json", "*.log")


def run_job(name: str, overrides: list[str], out: Path, dry_run: bool) -> dict[str, object]:
    """Run ``train.py`` for one job in ``out/<name>``; returns its time, return code and folder."""
    run_dir = out / name
    device = TINY if dry_run else ["trainer=gpu"]
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, *device, f"run_dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    figures = out / "figures" / name
    figures.mkdir(parents=True, exist_ok=True)
    for pattern in KEEP:
        for path in run_dir.glob(pattern) if run_dir.is_dir() else ():
            shutil.copy2(path, figures / path.name)
    return {"seconds": round(seconds, 1), "returncode": rc, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for runs, logs and figures")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes (checks the script)")
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: run_job(name, JOBS[name], args.out, args.dry_run) for name in args.jobs}
    (args.out / "times.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    print(f"{'job':<24} {'seconds':>9} {'rc':>3}")
    for name, r in results.items():
        print(f"{name:<24} {r['seconds']:>9} {r['returncode']:>3}")
    return max(int(r["returncode"]) for r in results.values())  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
