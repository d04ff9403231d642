"""The LightningModules of the three trainable stages (they take plain objects, never Hydra configs).

- :class:`DictionaryLearning` — learns the atoms Φ with LCA codes (stage ``dictionary``);
- :class:`WarpRegression` — trains the WARP-CNN state predictor (stage ``warp``);
- :class:`NoisyClassification` — the downstream noisy-classification study (stage ``classify``).

Imported lazily, so one module's heavy dependencies do not load with the others.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DictionaryLearning", "NoisyClassification", "WarpRegression"]

_LAZY = {
    "DictionaryLearning": "warplca.modules.dictionary_learning",
    "WarpRegression": "warplca.modules.warp_regression",
    "NoisyClassification": "warplca.modules.noisy_classification",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'warplca.modules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
