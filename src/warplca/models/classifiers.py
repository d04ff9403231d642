"""Classifier backbones for the noisy-classification experiment (pixels vs LCA codes vs WARP-LCA codes).

Each backbone maps the front end's features (B, C', H', W') — image channels for pixels, atoms for
codes — to class logits, with its stem adapted so it works on 32×32 pixels and 16×16×64 codes alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["BACKBONES", "SmallCNN", "build_backbone", "resnet18_classifier"]

#: inputs at most this size (pixels per side) get the small-image ResNet stem
SMALL_INPUT = 64


def resnet18_classifier(in_channels: int, num_classes: int, input_size: int = 32) -> nn.Module:
    """torchvision ResNet-18 (random init) with its stem adapted to ``in_channels`` × ``input_size``²:
    for ``input_size ≤ 64`` the CIFAR stem (3×3 stride 1, no max-pool, as in LCANets), else the standard."""
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
    """A small, fast CNN (trains in seconds on CPU): two pairs of conv-BN-ReLU blocks of ``width`` and
    ``2·width`` channels, each pair followed by a 2×2 max-pool, then global average pooling (any input
    resolution), dropout and a linear layer."""

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


def _check_dims(in_channels: int, num_classes: int, input_size: int) -> None:
    for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                             ("input_size", input_size, 4)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


#: backbone name (``model.classify.backbone``) -> builder(in_channels, num_classes, input_size, **kw)
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18_classifier,
    "small_cnn": SmallCNN,
}


def build_backbone(name: str, in_channels: int, num_classes: int, input_size: int = 32,
                   **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` for ``in_channels``-channel feature maps of side ``input_size``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels, num_classes, input_size=input_size, **kwargs)
