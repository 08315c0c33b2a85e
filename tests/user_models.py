"""User-style model factories for the ``package.module:callable`` tests (``tests.user_models:make``)."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 42
calls: list[dict[str, int]] = []  # what each factory was called with, for the tests to check


def _net(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def make(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Accepts both arguments the toolchain offers."""
    calls.append({"num_classes": num_classes, "in_channels": in_channels})
    return _net(in_channels, num_classes)


def make_rgb10() -> nn.Module:
    """Accepts nothing: always 3 channels in, 10 classes out."""
    return _net(3, 10)


def make_wrong_head(num_classes: int) -> nn.Module:
    """Ignores ``num_classes`` (a classic user bug): always 7 outputs."""
    return _net(3, 7)


def not_a_module() -> object:
    return "not a model"


class _Attention(nn.Module):
    """Conv features mixed across channels by multi-head attention (a ViT-style block)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(f, f, f)
        return self.fc(a.mean(1))


def make_attention(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _Attention(in_channels, num_classes)


class _HardCodedView(nn.Module):
    """Reshapes with a channel count written into forward: breaks once channels are removed."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv2(torch.relu(self.conv(x)))
        return self.fc(f.mean((2, 3)).view(-1, 16))


def make_hard_coded_view(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _HardCodedView(in_channels, num_classes)


def make_plain(num_classes: int, in_channels: int = 3) -> nn.Module:
    """No BatchNorm: its forward depends on no batch statistics, so data-parallel training with
    per-rank batches computes exactly the single-process gradients."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


class _EncoderDecoder(nn.Module):
    """A segmentation network as segmentation libraries build them: an encoder that halves the
    resolution, a decoder back to the input size, ``N x classes x H x W`` logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1)
        )
        self.decoder = nn.Sequential(nn.ReLU(), nn.Conv2d(16, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.encoder(x))
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def make_segmenter(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A user's segmentation model (per-pixel logits at the input resolution)."""
    return _EncoderDecoder(in_channels, num_classes)


def make_frozen(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A pretrained-style network: FrozenBatchNorm2d layers and a stem the user froze."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        FrozenBatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        FrozenBatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    net[0].weight.requires_grad_(False)
    return net


class TinyDetector(nn.Module):
    """A user's single-level anchor-free detector in the detection contract: one feature map at
    stride 8, a class logit per location and class, four box distances decoded around each
    location, and each location's prior square (what training assigns objects to)."""

    STRIDE = 8

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((in_channels, width), (width, 2 * width), (2 * width, 2 * width)):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.cls = nn.Conv2d(2 * width, num_classes, 1)
        self.box = nn.Conv2d(2 * width, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        n, _, h, w = f.shape
        ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) * self.STRIDE
        xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) * self.STRIDE
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx.flatten(), cy.flatten()], -1)  # (A, 2)
        priors = torch.cat([centres - 2 * self.STRIDE, centres + 2 * self.STRIDE], -1)
        scores = self.cls(f).flatten(2).transpose(1, 2)  # (N, A, K)
        sides = nn.functional.softplus(self.box(f)).flatten(2).transpose(1, 2) * self.STRIDE
        boxes = torch.cat([centres - sides[..., :2], centres + sides[..., 2:]], -1)
        return scores, boxes, priors.expand(n, -1, -1)


def make_detector(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A detection factory (``task: detection``)."""
    return TinyDetector(num_classes, in_channels)
