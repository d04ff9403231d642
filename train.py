"""Train warp-lca: ``python train.py [stages=[...]] [group=option ...] [key=value ...]``.

A thin wrapper over :func:`warplca.cli.train_main` (also installed as the ``warplca-train``
command); the work happens in :func:`warplca.tasks.train.train`. Returns the metric named by
``optimized_metric`` (for Hydra sweepers) when one is set. The configs live in ``conf/``.
"""

from __future__ import annotations

from warplca.cli import train_main as main

if __name__ == "__main__":
    main()
