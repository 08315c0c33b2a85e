"""timm models as ``model.arch`` factories, for trials of architectures torch-pruning finds hard:

    pip install timm
    flock /tmp/cpu.lock python bench/zoo.py --models bench.timm_models:ghostnet_100 \\
        bench.timm_models:fastvit_t8 --size 64 --out bench/results/timm.json

GhostNet's Ghost modules concatenate a layer with a depthwise transform of itself (torch-pruning
ties its channels twice); FastViT downsamples with depthwise convolutions that double the
channels (a channel multiplier). Built without weights (nothing is downloaded).
"""

from __future__ import annotations

from torch import nn


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import timm  # optional: only these trials need it

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def ghostnet_100(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _timm("ghostnet_100", num_classes, in_channels)


def fastvit_t8(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _timm("fastvit_t8", num_classes, in_channels)
