"""Pure-torch convolutional LCA: dictionary, thresholds, operators and the solver."""

from warplca.lca.dictionary import ConvDictionary, random_dictionary_like, stable_tau
from warplca.lca.solver import LCA, LCAResult
from warplca.lca.thresholds import THRESHOLDS, Threshold, get_threshold

__all__ = ["LCA", "THRESHOLDS", "ConvDictionary", "LCAResult", "Threshold", "get_threshold",
           "random_dictionary_like", "stable_tau"]
