"""warp-lca: convolutional sparse coding with LCA and its learned warm start WARP-LCA."""

from warplca.bundle import WarpLCA
from warplca.coder import SparseCoder
from warplca.lca import LCA, ConvDictionary, LCAResult, get_threshold
from warplca.models import WarpCNN

__version__ = "0.1.0"

__all__ = ["LCA", "ConvDictionary", "LCAResult", "SparseCoder", "WarpCNN", "WarpLCA", "__version__",
           "get_threshold"]
