"""The pieces every model shares: the input ``Normalize`` layer, the wrapper that carries
the model's spec, channel scaling for ``width``, weight init and the zoo registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from toolchain.registry import Registry
from toolchain.tasks import DEFAULT_TASK, task_named


class ZooFactory(Protocol):
    """What a registered zoo architecture is: a function building the bare network."""

    def __call__(self, *, num_classes: int, in_channels: int, width: float) -> nn.Module: ...


MODELS: Registry[ZooFactory] = Registry("model")


def zoo_task(arch: str) -> str:
    """The task a zoo architecture predicts for: a factory's ``task`` attribute (segmentation
    models set it), else classification."""
    return str(getattr(MODELS.get(arch), "task", DEFAULT_TASK))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so the model (and any export of it) takes [0, 1] pixels.

    Args:
        mean, std: one value per input channel, in [0, 1] pixel units.
        repeat: output this many copies of a single input channel after normalising; used to
            feed gray images to networks built for RGB (torchvision models), inside the model,
            so exported files still take 1-channel input.

    The statistics are buffers (saved in the state_dict, constants in ONNX), not parameters.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], repeat: int = 1) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std {len(std)}")
        if repeat > 1 and len(mean) != 1:
            raise ValueError("repeat is only meaningful for a single input channel")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.repeat = repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.expand(-1, self.repeat, -1, -1) if self.repeat > 1 else x

    def extra_repr(self) -> str:
        return f"channels={self.mean.shape[1]}, repeat={self.repeat}"


class NormalizedClassifier(nn.Module):
    """``net(normalize(x))``: a model on [0, 1] pixels that knows how to rebuild itself; its
    output is what its task reads of the network's (:meth:`toolchain.tasks.Task.model_output`:
    the main logits of a classifier with auxiliary heads, a detector's raw heads).

    Attributes:
        normalize: the :class:`Normalize` layer.
        net: the bare network (zoo, torchvision or user model), fed normalised input.
        spec: JSON-serialisable dict; ``build_from_spec(spec)`` rebuilds this architecture.
    """

    def __init__(self, normalize: Normalize, net: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.spec = dict(spec)

    def forward(self, x: torch.Tensor) -> Any:
        return task_named(self.spec.get("task")).model_output(self.net(self.normalize(x)))


def scaled(channels: int, width: float, divisor: int = 4) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``).

    Round counts waste fewer tensor-core lanes on GPUs; the rounding never drops more than
    10% below the exact product (the MobileNet rule).
    """
    exact = channels * width
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * exact else rounded


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, ReLU), BN weight 1 / bias 0, small-normal linears.

    Uses the global torch RNG, so ``torch.manual_seed`` before building fixes the weights.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free conv (same padding) followed by BatchNorm; the activation is the caller's.

    Activations in the zoo are never in-place: forward hooks that record activations (feature
    scoring, robustness sensitivity) must not see them overwritten.
    """
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]
