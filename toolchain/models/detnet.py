"""``detnet``: a small anchor-free object detector for CPUs (FCOS-style, Tian et al., ICCV 2019).

A residual backbone halves the resolution five times (strides 2 to 32); a feature pyramid
(Lin et al., CVPR 2017: 1x1 laterals, top-down nearest upsampling and addition, a 3x3 conv per
level) gives three levels at strides 8, 16 and 32 with the same channel count; one head, shared
by the levels, has a classification tower and a box tower (two 3x3 conv-BN-ReLU each), a class
logit per location and class (bias set to a 1% prior, as FCOS and RetinaNet do), four box
distances (left, top, right, bottom: ``softplus * stride``) and a centerness logit.

It returns the detection task's raw outputs (:mod:`toolchain.tasks.detection_ops`): class
logits ``(N, A, K)``, boxes decoded in the graph ``(N, A, 4)`` (clipped to the image), its
priors ``(N, A, 4)`` (a square of 4 x stride around each location, what training assigns
objects to) and the centerness logits ``(N, A, 1)``, with ``A`` the locations of the three
levels. Nothing is post-processed in the graph: NMS is the task's, after every runtime.

Pruning: the pyramid's levels and the shared head tie their channel counts together (the head
reads every level), which torch-pruning's dependency graph couples into one group, so they are
pruned consistently; the three prediction convs are the heads (their outputs are the classes,
the box sides and centerness) and keep their channels. At width 1.0 and 512x256 input it has
about 0.4 M parameters and 0.9 GMACs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.models.base import MODELS, conv_bn, init_weights, scaled

STRIDES = (8, 16, 32)
#: Side of each location's prior square, in strides.
PRIOR_SCALE = 4.0
PRIOR_PROBABILITY = 0.01


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, stride=stride), nn.ReLU())


class _Residual(nn.Module):
    """Two 3x3 conv-BN (the first strided), a projection shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(cin, cout, stride), *conv_bn(cout, cout))
        self.short = nn.Sequential(*conv_bn(cin, cout, kernel=1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class DetNet(nn.Module):
    """Backbone 16/32/48/64/96 channels (strides 2..32), pyramid and head 48 (at width 1.0).

    Input: any ``H x W`` divisible by 32. Output: see the module docstring.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled(n, width) for n in (16, 32, 48, 64, 96)]
        f = scaled(48, width)
        self.stem = _block(in_channels, c[0], stride=2)
        self.layer1 = _Residual(c[0], c[1], 2)  # 1/4
        self.layer2 = _Residual(c[1], c[2], 2)  # 1/8
        self.layer3 = _Residual(c[2], c[3], 2)  # 1/16
        self.layer4 = _Residual(c[3], c[4], 2)  # 1/32
        self.lateral = nn.ModuleList(nn.Conv2d(ch, f, 1) for ch in c[2:])
        self.smooth = nn.ModuleList(_block(f, f) for _ in STRIDES)
        self.cls_tower = nn.Sequential(_block(f, f), _block(f, f))
        self.box_tower = nn.Sequential(_block(f, f), _block(f, f))
        self.cls_pred = nn.Conv2d(f, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(f, 4, 3, padding=1)
        self.quality_pred = nn.Conv2d(f, 1, 3, padding=1)
        init_weights(self)
        prior_logit = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        for head, bias in ((self.cls_pred, prior_logit), (self.box_pred, 0.0), (self.quality_pred, 0.0)):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.constant_(head.bias, bias)  # type: ignore[arg-type]  # built with a bias

    def _pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.layer2(self.layer1(self.stem(x)))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return [smooth(p) for smooth, p in zip(self.smooth, (p3, p4, p5))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        scores, boxes, priors, quality = [], [], [], []
        for feature, stride in zip(self._pyramid(x), STRIDES):
            n, _, h, w = feature.shape
            cls = self.cls_tower(feature)
            reg = self.box_tower(feature)
            scores.append(self.cls_pred(cls).flatten(2).transpose(1, 2))
            quality.append(self.quality_pred(reg).flatten(2).transpose(1, 2))
            distances = F.softplus(self.box_pred(reg)).flatten(2).transpose(1, 2) * stride
            centers = _centers(h, w, stride, x)
            corners = torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], -1)
            limit = torch.tensor([width, height, width, height], dtype=x.dtype, device=x.device)
            boxes.append(torch.minimum(corners.clamp_min(0), limit))
            half = PRIOR_SCALE * stride / 2
            priors.append(torch.cat([centers - half, centers + half], -1).expand(n, -1, -1))
        return torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(priors, 1), torch.cat(quality, 1)


def _centers(h: int, w: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, h * w, 2)`` pixel centres ``(x, y)`` of a level's locations, row by row."""
    ys = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) * stride
    xs = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], 1).unsqueeze(0)


@MODELS.register("detnet")
def detnet(*, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """The small :class:`DetNet` detector (use ``task: detection``)."""
    return DetNet(num_classes, in_channels, width)


detnet.task = "detection"  # type: ignore[attr-defined]  # read by models.base.zoo_task
