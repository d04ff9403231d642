"""Pure-torch convolutional LCA: dictionary, thresholds, operators and the solver."""

from warplca.lca.dictionary import ConvDictionary, random_dictionary_like, stable_tau
from warplca.lca.resampling import atom_usage, dead_atoms, resample_atoms, used_atoms
from warplca.lca.solver import LCA, LCAResult
from warplca.lca.thresholds import THRESHOLDS, Threshold, get_threshold

__all__ = ["LCA", "THRESHOLDS", "ConvDictionary", "LCAResult", "Threshold", "atom_usage", "dead_atoms",
           "get_threshold", "random_dictionary_like", "resample_atoms", "stable_tau", "used_atoms"]
