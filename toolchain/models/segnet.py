"""``segnet``: a small encoder-decoder for semantic segmentation, sized for CPUs.

A U-Net-like network (Ronneberger et al. 2015) cut down to three resolutions: the encoder
halves the resolution three times (stride-2 conv-BN-ReLU, then a 3x3 conv-BN-ReLU at each
level), the decoder upsamples bilinearly and concatenates the encoder's features of the same
resolution (skip connections) before a 3x3 conv-BN-ReLU, and a 1x1 conv gives the class
logits, upsampled to the input size. At width 1.0 and 256x128 input it has about 0.2 M
parameters and 0.3 GMACs.

The concatenations couple channels across the network: pruning an encoder layer removes the
matching input channels of the decoder conv that reads its skip (torch-pruning's dependency
graph handles the index shift inside a concatenation). The final 1x1 conv is the classifier
head and is never pruned (:func:`toolchain.pruning.graph.classifier_layers` finds it through
the upsampling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, stride=stride), nn.ReLU())


class SegNet(nn.Module):
    """Encoder 16/32/48/64 channels (stem at 1/2, then 1/4, 1/8), decoder 48/32/24 with skips.

    Input: any ``H x W`` (multiples of 8 keep the levels aligned; others are resized to the
    skip's size). Output: ``N x num_classes x H x W`` logits.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c0, c1, c2, c3 = (scaled(c, width) for c in (16, 32, 48, 64))
        d2, d1, d0 = (scaled(c, width) for c in (48, 32, 24))
        self.stem = _block(in_channels, c0, stride=2)  # 1/2
        self.enc1 = nn.Sequential(_block(c0, c1, stride=2), _block(c1, c1))  # 1/4
        self.enc2 = nn.Sequential(_block(c1, c2, stride=2), _block(c2, c2))  # 1/8
        self.context = _block(c2, c3)  # 1/8, wider receptive field before decoding
        self.dec2 = _block(c3 + c1, d2)  # 1/4: upsampled context + enc1
        self.dec1 = _block(d2 + c0, d1)  # 1/2: upsampled dec2 + stem
        self.refine = _block(d1, d0)
        self.classifier = nn.Conv2d(d0, num_classes, 1)
        init_weights(self)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.enc1(s0)
        s2 = self.context(self.enc2(s1))
        y = self.dec2(torch.cat([self._up(s2, s1), s1], 1))
        y = self.dec1(torch.cat([self._up(y, s0), s0], 1))
        return self._up(self.classifier(self.refine(y)), x)


@MODELS.register("segnet")
def segnet(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """The small :class:`SegNet` encoder-decoder (a segmentation model: use ``task: segmentation``)."""
    return SegNet(num_classes, in_channels, width)


segnet.task = "segmentation"  # type: ignore[attr-defined]  # read by models.base.zoo_task
