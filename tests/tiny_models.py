"""Tiny models with the structures pruning must handle: residual sums, concatenation,
depthwise and grouped convolutions, a convolutional head. Shared by the pruning tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Block(nn.Module):
    """Basic residual block; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.bn = nn.BatchNorm2d(cout)
        self.short = (
            nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.body(x)) + self.short(x))


class ResidualNet(nn.Module):
    """Residual additions couple the stem, both blocks of a stage and the shortcut."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.stage1 = nn.Sequential(Block(width, width), Block(width, width))
        self.stage2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    """torch.cat of two branches of different widths feeds one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.left = conv_bn(16, 12)
        self.right = conv_bn(16, 20)
        self.merge = conv_bn(32, 24)
        self.fc = nn.Linear(24, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.merge(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc(x.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """MobileNet-style: a depthwise conv ties its input and output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16), conv_bn(16, 16, groups=16), nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class GroupedNet(nn.Module):
    """A grouped conv (4 groups of 8) must lose the same positions in every group."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 32), conv_bn(32, 32, groups=4), conv_bn(32, 24))
        self.fc = nn.Linear(24, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class ConvHeadNet(nn.Module):
    """All-conv classifier: a 1x1 conv to the classes, then global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_bn(3, 16)
        self.head = nn.Conv2d(16, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).mean(dim=(2, 3))


class AuxNet(nn.Module):
    """GoogLeNet-style: an auxiliary head reads mid-network features and runs in train mode only,
    when the model returns ``(logits, aux_logits)``."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.body = conv_bn(16, 24, stride=2)
        self.aux = nn.Sequential(
            nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
        )
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.stem(x)
        logits = self.fc(self.body(features).mean(dim=(2, 3)))
        if self.training:
            return logits, self.aux(features)
        return logits


class VersionedNet(nn.Module):
    """Like torchvision's MNASNet: refuses weights whose state_dict metadata lacks its version."""

    _version = 2

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), conv_bn(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def tiny_shufflenet(num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's ShuffleNetV2 (channel shuffles, chunks) with one block per stage."""
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 64], num_classes=num_classes)


def tiny_vit(num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's VisionTransformer for 16x16 images: 16 tokens of width 16, two heads."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        16, 4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes
    )


def tiny_swin(num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's Swin Transformer (attention that calls F.linear on its layers' weights)."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([2, 2], 8, [1, 1], [2, 2], [2, 2], num_classes=num_classes)


class GhostModule(nn.Module):
    """GhostNet's module (timm's layout): a primary conv and a depthwise "cheap" conv of its
    output, concatenated and sliced to ``cout`` (torch-pruning ties each primary channel to two
    positions of the group it joins)."""

    def __init__(self, cin: int, cout: int, act: bool) -> None:
        super().__init__()
        half = cout // 2
        self.cout = cout
        self.primary = nn.Sequential(
            nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU() if act else nn.Identity()
        )
        self.cheap = nn.Sequential(
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU() if act else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, : self.cout]


class TinyGhostNet(nn.Module):
    """A stem, one Ghost bottleneck (expand with activation, project without, residual) and a
    head: the group the bottleneck folds is left alone, the others pruned."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.ghost1 = GhostModule(16, 32, act=True)
        self.ghost2 = GhostModule(32, 16, act=False)
        self.expand = conv_bn(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.stem(x)
        x = self.ghost2(self.ghost1(shortcut)) + shortcut  # timm's order: x += shortcut
        return self.fc(self.expand(x).mean(dim=(2, 3)))


class MultiplierNet(nn.Module):
    """A depthwise conv with a channel multiplier (two outputs per input channel), as in FastViT's
    downsampling: the group feeding it is left alone, the rest pruned."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.body = conv_bn(16, 16)
        self.down = nn.Sequential(
            nn.Conv2d(16, 32, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.mix = conv_bn(32, 24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.body(self.stem(x)))
        return self.fc(self.mix(x).mean(dim=(2, 3)))
