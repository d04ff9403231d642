"""Evaluate warp-lca runs: ``python evaluate.py run_dir=<dir> [eval=convergence|thresholds|denoise|ood|all]``.

A thin wrapper over :func:`warplca.cli.eval_main` (also installed as the ``warplca-eval`` command);
the work happens in :func:`warplca.tasks.evaluate.evaluate`. Also ``python evaluate.py
sweep_dir=<multirun dir>`` (sweep summary) and ``results_md=docs/results.md`` (README results
page). See ``conf/eval.yaml`` for every option.
"""

from __future__ import annotations

from warplca.cli import eval_main as main

if __name__ == "__main__":
    main()
