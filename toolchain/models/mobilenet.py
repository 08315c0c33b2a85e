"""``mobilenetv2``, CIFAR variant: MobileNetV2 (Sandler et al. 2018) with a stride-1 stem and
stride 1 in the second stage, so 32x32 inputs end at 4x4 instead of 1x1.

Inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 linear projection; a residual only
where input and output shapes match. The depthwise convs are what make this the zoo's
test case for grouped-conv pruning.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled

# (expansion t, channels c, repeats n, first stride s), as in the paper's table 2, except
# the second row's stride (2 -> 1) for small inputs.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3, ``stride``), project (1x1, no activation)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(in_ch, hidden, kernel=1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, stride=stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, out_ch, kernel=1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    """Stem conv, inverted-residual stages, 1x1 conv to the last width, pool, linear."""

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(32, width, divisor=8)
        layers: list[nn.Module] = [nn.Sequential(*conv_bn(in_channels, stem), nn.ReLU6())]
        in_ch = stem
        for expansion, channels, repeats, stride in _SETTINGS:
            out_ch = scaled(channels, width, divisor=8)
            for i in range(repeats):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
        last = scaled(1280, width, divisor=8)
        layers.append(nn.Sequential(*conv_bn(in_ch, last, kernel=1), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("mobilenetv2")
def mobilenetv2(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """MobileNetV2 for 28x28/32x32 inputs (~2.2M params at width 1)."""
    return CifarMobileNetV2(num_classes, in_channels, width)
