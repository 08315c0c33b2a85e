"""``convnet``: a tiny four-layer CNN (about 70k parameters) for tests and the quickstart."""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled


class ConvNet(nn.Module):
    """conv-BN-ReLU x4 (16, 32/2, 64/2, 64 channels), global average pool, linear.

    Two stride-2 layers take 32x32 to 8x8 (28x28 to 7x7); the global pool makes any input
    size of at least 4x4 work.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = scaled(16, width), scaled(32, width), scaled(64, width)
        layers: list[nn.Module] = []
        for cin, cout, stride in ((in_channels, c1, 1), (c1, c2, 2), (c2, c3, 2), (c3, c3, 1)):
            layers += [*conv_bn(cin, cout, stride=stride), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c3, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("convnet")
def convnet(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """The tiny :class:`ConvNet`."""
    return ConvNet(num_classes, in_channels, width)
