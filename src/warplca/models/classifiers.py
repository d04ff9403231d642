"""Classifier backbones for the noisy-classification experiment (pixels vs LCA codes vs WARP-LCA codes).

Each backbone takes the front end's feature map (B, C', H', W') — C' = image channels for pixels,
C' = n_atoms for codes — and returns class logits. The stem is adapted to the input so that the same
network works on 32×32 pixels and on 16×16×64 codes:

- ``resnet18``: torchvision ``resnet18(weights=None)``; for small inputs (≤ 64 px) the stem is a
  3×3 stride-1 convolution with no max-pool (the CIFAR variant, as in LCANets), otherwise the
  ImageNet 7×7 stride-2 stem + max-pool; ``conv1.in_channels`` is the front end's channel count.
- ``small_cnn``: :class:`SmallCNN`, a 4-conv BatchNorm network that trains in seconds on CPU (the
  default for digits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["BACKBONES", "SmallCNN", "build_backbone", "resnet18_classifier"]

#: inputs at most this size (pixels per side) get the small-image ResNet stem
SMALL_INPUT = 64


def resnet18_classifier(in_channels: int, num_classes: int, input_size: int = 32) -> nn.Module:
    """torchvision ResNet-18 (random init) with its stem adapted to ``in_channels`` × ``input_size``².

    For ``input_size ≤ 64``: ``conv1`` = 3×3 stride 1 and no max-pool (a 32×32 image or a 16×16 code map
    keeps its resolution into ``layer1``); otherwise the standard 7×7 stride-2 stem with max-pool.
    """
    from torchvision.models import resnet18

    _check_dims(in_channels, num_classes, input_size)
    net = resnet18(weights=None, num_classes=num_classes)
    if input_size <= SMALL_INPUT:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


class SmallCNN(nn.Module):
    """A small, fast CNN: two conv-BN-ReLU blocks of ``width`` and ``2·width`` channels, each followed by
    a 2×2 max-pool, then global average pooling, dropout and a linear layer.

    Global pooling makes it independent of the input resolution (32×32 pixels or 16×16 codes alike).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.2,
                 input_size: int | None = None) -> None:
        super().__init__()
        _check_dims(in_channels, num_classes, input_size or 8)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _small_cnn(in_channels: int, num_classes: int, input_size: int = 32, **kwargs: Any) -> nn.Module:
    return SmallCNN(in_channels, num_classes, input_size=input_size, **kwargs)


def _check_dims(in_channels: int, num_classes: int, input_size: int) -> None:
    for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                             ("input_size", input_size, 4)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


#: backbone name (``model.classify.backbone``) -> builder(in_channels, num_classes, input_size, **kw)
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18_classifier,
    "small_cnn": _small_cnn,
}


def build_backbone(name: str, in_channels: int, num_classes: int, input_size: int = 32,
                   **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` for ``in_channels``-channel feature maps of side ``input_size``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels, num_classes, input_size=input_size, **kwargs)
