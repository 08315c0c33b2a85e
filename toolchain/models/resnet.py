"""CIFAR-style ResNets: ``resnet20`` (He et al. 2016, 3 stages of 16/32/64) and ``resnet18``
(3x3 stride-1 stem, no max-pool, 4 stages of 64/128/256/512).

Shortcuts that change shape are 1x1 conv + BN projections (option B) rather than the paper's
zero-padding (option A): a projection is an ordinary layer that torch-pruning's dependency
graph can couple to the residual branch, while zero-padding hides a channel mapping in code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_ch, out_ch, stride=stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(out_ch, out_ch)
        projection = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride)) if projection else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem at stride 1, stages of :class:`BasicBlock` (the first of each later stage at
    stride 2), global average pool, linear.

    Args:
        blocks: blocks per stage.
        widths: channels per stage before the ``width`` multiplier; the stem uses the first.
        num_classes, in_channels: output classes and input channels.
        width: channel multiplier.
    """

    def __init__(
        self, blocks: Sequence[int], widths: Sequence[int], num_classes: int, in_channels: int, width: float
    ) -> None:
        super().__init__()
        channels = [scaled(w, width) for w in widths]
        self.stem = nn.Sequential(*conv_bn(in_channels, channels[0]), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = channels[0]
        for index, (count, out_ch) in enumerate(zip(blocks, channels)):
            layers = []
            for b in range(count):
                layers.append(BasicBlock(in_ch, out_ch, stride=2 if index > 0 and b == 0 else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@MODELS.register("resnet20")
def resnet20(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """ResNet-20 for 32x32 inputs: 3 stages x 3 blocks, 16/32/64 channels (~0.27M params)."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels, width)


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """ResNet-18, CIFAR variant: 4 stages x 2 blocks, 64..512 channels (~11M params)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, width)
