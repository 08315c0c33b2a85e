"""``vgg11_bn``, CIFAR variant: VGG-11 convolutions with BatchNorm, four max-pools instead
of five (so 28x28 inputs still have a 1x1 map at the end), global average pool and a small
two-layer classifier instead of VGG's 4096-wide one.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled

# Channels per conv, "M" = 2x2 max-pool. VGG-11 ("A") without its fifth pool.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


class CifarVGG(nn.Module):
    """conv-BN-ReLU stacks with max-pools, global average pool, linear-ReLU-linear."""

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = in_channels
        for item in _VGG11:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_ch = scaled(int(item), width)
                layers += [*conv_bn(in_ch, out_ch), nn.ReLU()]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(256, width)
        self.classifier = nn.Sequential(nn.Linear(in_ch, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("vgg11_bn")
def vgg11_bn(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """VGG-11 with BatchNorm for 28x28/32x32 inputs (~9.4M params at width 1)."""
    return CifarVGG(num_classes, in_channels, width)
