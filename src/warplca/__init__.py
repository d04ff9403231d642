"""warp-lca: convolutional sparse coding with LCA and its learned warm start WARP-LCA."""

from warplca.lca import LCA, ConvDictionary, LCAResult, get_threshold

__version__ = "0.1.0"

__all__ = ["LCA", "ConvDictionary", "LCAResult", "__version__", "get_threshold"]
