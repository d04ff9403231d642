"""The Hydra edge: pure task functions that ``train.py`` / ``evaluate.py`` call, and the pipeline stages.

``warplca.tasks.train.train(cfg)`` runs ``cfg.stages`` (:mod:`warplca.tasks.stages`) with a ``RunContext``.
"""

from __future__ import annotations

from warplca.tasks.context import RunContext
from warplca.tasks.stages import STAGE_ORDER, run_stages

__all__ = ["STAGE_ORDER", "RunContext", "run_stages"]
