"""Networks: the WARP-CNN state predictor and classifier backbones."""

from warplca.models.classifiers import BACKBONES, SmallCNN, build_backbone, resnet18_classifier
from warplca.models.warp_cnn import WarpCNN

__all__ = ["BACKBONES", "SmallCNN", "WarpCNN", "build_backbone", "resnet18_classifier"]
