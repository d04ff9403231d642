"""Frozen front ends for downstream classification: [0, 1] images → features a classifier learns on.

``pixels`` (normalised pixels), ``lca`` (cold LCA codes) and ``warp_lca`` (WARP-LCA codes): frozen
copies in eval mode, run without autograd, whose features are exactly the solver's codes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from warplca.coder import SparseCoder
from warplca.data.normalization import Normalization
from warplca.lca import LCA, ConvDictionary, LCAResult
from warplca.lca.solver import SETTINGS

__all__ = ["FRONTENDS", "FrontEnd", "LCAFrontEnd", "PixelFrontEnd", "WarpLCAFrontEnd", "WarpModel",
           "build_frontend"]

#: solver settings an :class:`LCAFrontEnd` accepts


@runtime_checkable
class WarpModel(Protocol):
    """What :class:`WarpLCAFrontEnd` needs from a WARP-LCA model (``warplca.bundle.WarpLCA``)."""

    dictionary: ConvDictionary

    def preprocess(self, images: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor, iters: int, warm: bool = True) -> LCAResult: ...


def _as_normalization(norm: Normalization | Mapping[str, Any] | None, channels: int) -> Normalization:
    if norm is None:
        return Normalization.identity(channels)
    if isinstance(norm, Mapping):
        norm = Normalization.from_dict(norm)
    elif not isinstance(norm, Normalization):
        raise ValueError(f"normalization must be a Normalization, a dict or None, got {type(norm).__name__}")
    if norm.channels != channels:
        raise ValueError(f"normalization has {norm.channels} channels but the front end expects {channels}")
    return norm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FrontEnd(nn.Module):
    """Base class: a frozen map from [0, 1] images (B, ``in_channels``, H, W) to features (B, C', H', W');
    subclasses implement :meth:`_features` and :meth:`feature_shape`."""

    kind: ClassVar[str] = ""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = int(in_channels)

    def freeze_(self) -> FrontEnd:
        """Stop gradients into every parameter and switch to eval mode (called by subclasses)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrontEnd:
        """Stay in eval mode: a parent ``.train()`` must not switch a predictor's BatchNorm to batch stats."""
        return super().train(False)

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C', H', W') of the features of an H×W image."""
        raise NotImplementedError

    def _features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Features of [0, 1] images (no autograd graph)."""
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            desc = (f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor)
                    else type(images).__name__)
            raise ValueError(f"{type(self).__name__} expects float images (B, C, H, W) in [0, 1], got {desc}")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels}-channel images, "
                             f"got {images.shape[1]} channels")
        with torch.no_grad():
            return self._features(images)

    def timed(self, images: Tensor) -> tuple[Tensor, float]:
        """Features and the wall-clock cost in milliseconds per image (device-synchronised)."""
        _sync(images.device)
        start = time.perf_counter()
        out = self(images)
        _sync(images.device)
        return out, 1000.0 * (time.perf_counter() - start) / max(1, images.shape[0])

    def spec(self) -> dict[str, Any]:
        """Plain description (kind, iterations, …) for logs and checkpoints."""
        return {"kind": self.kind, "in_channels": self.in_channels}


class PixelFrontEnd(FrontEnd):
    """The baseline: normalised pixels ``(images − mean_c) / scale``, same shape as the images."""

    kind = "pixels"

    def __init__(self, in_channels: int = 3,
                 normalization: Normalization | Mapping[str, Any] | None = None) -> None:
        super().__init__(in_channels)
        self.normalization = _as_normalization(normalization, self.in_channels)
        self.freeze_()

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.in_channels, height, width)

    def _features(self, images: Tensor) -> Tensor:
        return self.normalization.apply(images)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "normalization": self.normalization.to_dict()}


class WarpLCAFrontEnd(FrontEnd):
    """Codes of a sparse coder: ``bundle(bundle.preprocess(images), iters, warm=warm).a``.

    ``bundle`` is a ``warplca.bundle.WarpLCA`` or any :class:`~warplca.coder.SparseCoder` (a frozen copy
    is kept); ``warm=False`` runs it cold (an ablation).
    """

    kind = "warp_lca"

    def __init__(self, bundle: WarpModel, iters: int = 20, warm: bool = True) -> None:
        if not isinstance(bundle, nn.Module) or not isinstance(bundle, WarpModel):
            raise ValueError("bundle must be a WarpLCA-like nn.Module with .dictionary, .preprocess and "
                             f"__call__(x, iters, warm), got {type(bundle).__name__}")
        super().__init__(bundle.dictionary.in_channels)
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
            raise ValueError(f"iters must be an integer ≥ 0, got {iters!r}")
        self.iters = iters
        self.warm = bool(warm)
        self.bundle = copy.deepcopy(bundle)
        self.freeze_()

    @property
    def dictionary(self) -> ConvDictionary:
        return self.bundle.dictionary

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.dictionary.code_shape(height, width)

    def _features(self, images: Tensor) -> Tensor:
        x = self.bundle.preprocess(images).to(self.dictionary.weight.dtype)
        return self.bundle(x, iters=self.iters, warm=self.warm).a

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "iters": self.iters, "warm": self.warm,
                "dictionary": self.dictionary.config()}


class LCAFrontEnd(WarpLCAFrontEnd):
    """Cold-started LCA codes: ``LCA(D, **lca_settings)(normalization.apply(images), iters).a``.

    ``lca_settings`` is an :class:`LCA` or a mapping (keys outside :data:`warplca.lca.solver.SETTINGS` and
    ``iters`` are ignored);
    ``normalization`` maps pixels to the coded space (identity if None). The atoms are a frozen copy.
    """

    kind = "lca"

    def __init__(self, dictionary: ConvDictionary, lca_settings: LCA | Mapping[str, Any] | None = None,
                 iters: int = 1000, normalization: Normalization | Mapping[str, Any] | None = None) -> None:
        if not isinstance(dictionary, ConvDictionary):
            raise ValueError(f"dictionary must be a ConvDictionary, got {type(dictionary).__name__}")
        settings = lca_settings.settings() if isinstance(lca_settings, LCA) else dict(lca_settings or {})
        settings = {k: v for k, v in settings.items() if k in SETTINGS and k != "iters"}
        norm = _as_normalization(normalization, dictionary.in_channels)
        lca = LCA(dictionary, **settings)
        super().__init__(SparseCoder(dictionary, lca, norm), iters, warm=False)
        self.lca_settings = {k: v for k, v in lca.settings().items() if k != "iters"}

    @property
    def lca(self) -> LCA:
        return self.bundle.lca

    @property
    def normalization(self) -> Normalization:
        return self.bundle.normalization

    def spec(self) -> dict[str, Any]:
        return {**FrontEnd.spec(self), "iters": self.iters, "lca": dict(self.lca_settings),
                "dictionary": self.dictionary.config(), "normalization": self.normalization.to_dict()}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # older classifier checkpoints name the atoms "<prefix>dictionary.weight"
        old = prefix + "dictionary.weight"
        if old in state_dict:
            state_dict[prefix + "bundle.dictionary.weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args)


FRONTENDS: dict[str, type[FrontEnd]] = {c.kind: c for c in (PixelFrontEnd, LCAFrontEnd, WarpLCAFrontEnd)}


def build_frontend(kind: str, *, in_channels: int | None = None, dictionary: ConvDictionary | None = None,
                   lca_settings: LCA | Mapping[str, Any] | None = None, iters: int | None = None,
                   bundle: WarpModel | None = None,
                   normalization: Normalization | Mapping[str, Any] | None = None) -> FrontEnd:
    """Build a front end by name from the pieces it needs: ``pixels`` needs ``in_channels`` (or a
    dictionary, bundle or normalization to read it from); ``lca`` a ``dictionary`` and ``iters``;
    ``warp_lca`` a ``bundle`` and ``iters``."""
    if kind not in FRONTENDS:
        raise ValueError(f"unknown front end {kind!r}; known: {sorted(FRONTENDS)}")
    if kind == "pixels":
        if in_channels is None:
            source = dictionary if dictionary is not None else getattr(bundle, "dictionary", None)
            if source is not None:
                in_channels = source.in_channels
            elif normalization is not None:
                in_channels = len(normalization.mean if isinstance(normalization, Normalization)
                                  else normalization["mean"])
            else:
                raise ValueError("front end 'pixels' needs in_channels (or a normalization / dictionary)")
        return PixelFrontEnd(in_channels, normalization)
    if iters is None:
        raise ValueError(f"front end {kind!r} needs iters")
    if kind == "lca":
        if dictionary is None:
            raise ValueError("front end 'lca' needs a dictionary")
        return LCAFrontEnd(dictionary, lca_settings, iters, normalization)
    if bundle is None:
        raise ValueError("front end 'warp_lca' needs a WARP-LCA bundle")
    return WarpLCAFrontEnd(bundle, iters)
