"""Networks: the WARP-CNN state predictor (and classifier backbones)."""

from warplca.models.warp_cnn import WarpCNN

__all__ = ["WarpCNN"]
