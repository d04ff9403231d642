"""The LightningModules of the trainable stages ``dictionary``, ``warp`` and ``classify`` (plain objects in,
never Hydra configs); imported lazily, so one module's heavy dependencies do not load with the others."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DictionaryLearning", "NoisyClassification", "WarpRegression"]

_LAZY = {"DictionaryLearning": "dictionary_learning", "WarpRegression": "warp_regression",
         "NoisyClassification": "noisy_classification"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"warplca.modules.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'warplca.modules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
