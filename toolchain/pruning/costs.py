"""The cost model behind channel masks: each counted layer's MACs and parameters as a function
of its live input and output channels, calibrated on torch-pruning's layer-wise counter.

A counted layer costs ``a * in_live * out_live + b * out_live + c * live + d``: convolutions
and linear layers are bilinear in their channels, BatchNorm, activations and pooling scale with
the channels they pass, ``nn.MultiheadAttention`` is quadratic in its embedding width (its
input and output are the same channels). What torch-pruning counts outside these layers stays
fixed.

Where a layer's channels sit in its output depends on the model: ``N x C x H x W`` for
convolutions, ``N x ... x C`` for linear layers and LayerNorm (ViT tokens, ConvNeXt and Swin
blocks after a permute). :class:`CallRecorder` works it out per call from the layer's own width,
and for parameter-free layers (activations) from the layer that produced their input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn


@dataclass
class Cost:
    """One counted layer: ``a * in_live * out_live + b * out_live + c * live + d``."""

    a: float
    b: float
    c: float
    d: float
    in_index: Tensor | None  # flat position per input channel (total = always live)
    out_index: Tensor | None  # flat position per output channel

    def value(self, ext: Tensor, in_total: int, out_total: int) -> Tensor:
        in_live = ext[self.in_index].sum() if self.in_index is not None else ext.new_tensor(float(in_total))
        out_live = (
            ext[self.out_index].sum() if self.out_index is not None else ext.new_tensor(float(out_total))
        )
        return self.a * in_live * out_live + self.b * out_live + self.c * out_live + self.d


@dataclass
class LayerCost:
    """A counted layer (one call of it, for layers called more than once).

    Attributes:
        name: the layer's qualified name; kind: its class name.
        macs, params: its cost as a function of the mask.
        in_width, out_width: its dense input and output channels.
        dense_macs, dense_params: its share of torch-pruning's count on the dense model.
    """

    name: str
    kind: str
    macs: Cost
    params: Cost
    in_width: int
    out_width: int
    dense_macs: float
    dense_params: float


#: One call of a layer: (its output's autograd node, channel width, output shape).
Call = tuple[Any, int, tuple[int, ...]]
#: Per layer (or autograd node, or parameter): ``(its channel indices, their flat mask positions)``.
Maps = dict[Any, list[tuple[list[int], list[int]]]]
#: ``(layer, width, maps) -> flat position per channel`` (None: the maps do not fit the width).
IndexOf = Callable[[Any, int, list[tuple[list[int], list[int]]]], Tensor | None]

_CONSUMERS = (nn.modules.conv._ConvNd, nn.Linear)


def counted_units(model: nn.Module) -> list[nn.Module]:
    """Leaf layers, plus attention modules torch-pruning counts as a whole (not their parts)."""
    units = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    leaves = [m for m in model.modules() if not any(True for _ in m.children()) and id(m) not in inside]
    return [*leaves, *units]


class CallRecorder:
    """Records every call of the counted layers: output node, channel width, output shape."""

    def __init__(self) -> None:
        self.calls: dict[nn.Module, list[Call]] = {}
        self._axis: dict[Any, int] = {}  # autograd node -> channel axis of that tensor

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[dict[nn.Module, list[Call]]]:
        handles = [m.register_forward_hook(self._remember) for m in counted_units(model)]
        try:
            yield self.calls
        finally:
            for handle in handles:
                handle.remove()

    def _remember(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            output = output[0]  # attention returns (output, weights)
        if not isinstance(output, Tensor) or output.dim() < 2:
            return
        axis = self._channel_axis(module, inputs, output)
        if output.grad_fn is not None:
            self._axis[output.grad_fn] = axis
        self.calls.setdefault(module, []).append(
            (output.grad_fn, int(output.shape[axis]), tuple(output.shape))
        )

    def _channel_axis(self, module: nn.Module, inputs: Any, output: Tensor) -> int:
        last = output.dim() - 1
        width = out_width(module)
        if width:
            return next((axis for axis in (1, last) if output.shape[axis] == width), 1)
        source = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        axis = self._axis.get(source.grad_fn) if source is not None and source.grad_fn is not None else None
        if axis is None or source is None:
            return 1
        if source.shape == output.shape:
            return axis
        dims = getattr(module, "dims", None)  # a permute module (torchvision's Permute)
        if isinstance(dims, (list, tuple)) and len(dims) == output.dim() and axis < source.dim():
            return list(dims).index(axis % source.dim())
        return 1


def cost_model(
    model: nn.Module,
    example_inputs: Tensor,
    calls: dict[nn.Module, list[Call]],
    consumer_index: dict[nn.Module, Tensor],
    producers: Maps,
    unwrapped: dict[nn.Parameter, int],
    index_of: IndexOf,
) -> tuple[list[LayerCost], float, float]:
    """Every counted layer's cost as a function of the mask, and the fixed MACs and params.

    Args:
        model, example_inputs: the model and the batch torch-pruning counts on.
        calls: from :class:`CallRecorder` (the same trace the groups came from).
        consumer_index: flat mask position per input channel of each consuming layer.
        producers: channel maps of layers (and activations, by autograd node) whose outputs
            belong to groups.
        unwrapped: parameters torch-pruning prunes outside any layer, with their axis.
        index_of: builds a flat position index from maps.
    """
    names: dict[Any, str] = {module: name for name, module in model.named_modules()}
    names.update({param: name for name, param in model.named_parameters()})
    total_macs, total_params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, example_inputs, layer_wise=True
    )
    costs = []
    counted_macs = counted_params = 0.0
    for module in counted_units(model):
        macs = float(layer_macs.get(module) or 0)
        params = float(layer_params.get(module) or 0)
        if not macs and not params:
            continue
        seen = calls.get(module) or [(None, out_width(module), (1,))]
        if isinstance(module, _CONSUMERS):
            seen = seen[:1]  # a reused conv/linear has one set of channels
        size = sum(math.prod(shape) for _, _, shape in seen)
        for grad_fn, width, shape in seen:
            share = math.prod(shape) / size
            out_maps = producers.get(module) or producers.get(grad_fn)
            out_index = index_of(module, width, out_maps) if out_maps and width else None
            mac_cost, param_cost = layer_costs(
                module, macs * share, params * share, consumer_index.get(module), out_index, width, shape
            )
            name = names.get(module, type(module).__name__)
            in_total = in_width(module) or width
            costs.append(
                LayerCost(
                    name,
                    type(module).__name__,
                    mac_cost,
                    param_cost,
                    in_total,
                    width,
                    macs * share,
                    params * share,
                )
            )
        counted_macs += macs
        counted_params += params
    for param, axis in unwrapped.items():
        # A parameter used outside any layer (ViT's class token and position embedding) loses
        # one slice per removed channel.
        width = int(param.shape[axis])
        index = index_of(param, width, producers[param])
        if index is None:
            continue
        fixed, per_channel = Cost(0, 0, 0, 0, None, None), Cost(0, 0, param.numel() / width, 0, None, index)
        name = names.get(param, "parameter")
        costs.append(
            LayerCost(name, "Parameter", fixed, per_channel, width, width, 0.0, float(param.numel()))
        )
        counted_params += param.numel()
    # Whatever else torch-pruning counts stays fixed.
    return costs, float(total_macs) - counted_macs, float(total_params) - counted_params


def in_width(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return out_width(module)


def out_width(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return int(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    return 0  # unknown width: the layer's cost is treated as fixed


def layer_costs(
    module: nn.Module,
    macs: float,
    params: float,
    in_index: Tensor | None,
    out_index: Tensor | None,
    width: int,
    shape: tuple[int, ...],
) -> tuple[Cost, Cost]:
    """Split a layer's dense MACs/params into the terms that scale with live channels."""
    if isinstance(module, nn.MultiheadAttention) and out_index is not None:
        attention = _attention_costs(module, macs, params, out_index, shape)
        if attention is not None:
            return attention
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1
        out_total, in_total = out_width(module), in_width(module)
        if depthwise:
            # groups, input and output shrink together: cost is linear in the live channels.
            return (
                Cost(0, 0, macs / out_total, 0, None, out_index),
                Cost(0, 0, params / out_total, 0, None, out_index),
            )
        bias = module.bias is not None
        spatial = _bias_macs_per_channel(module, macs, in_total, out_total) if bias else 0.0
        mac_a = (macs - spatial * out_total) / (in_total * out_total)
        param_b = 1.0 if bias else 0.0
        param_a = (params - param_b * out_total) / (in_total * out_total)
        return (
            Cost(mac_a, spatial, 0, 0, in_index, out_index),
            Cost(param_a, param_b, 0, 0, in_index, out_index),
        )
    if out_index is None or not width:
        return Cost(0, 0, 0, macs, None, None), Cost(0, 0, 0, params, None, None)
    return Cost(0, 0, macs / width, 0, None, out_index), Cost(0, 0, params / width, 0, None, out_index)


def _attention_costs(
    module: nn.MultiheadAttention, macs: float, params: float, index: Tensor, shape: tuple[int, ...]
) -> tuple[Cost, Cost] | None:
    """torch-pruning's count for self-attention of width E over L tokens, per sample:
    ``4 L E^2 + (2 L + 3 L [in-projection bias] + 2 L^2) E + heads L^2``; parameters
    ``4 E^2 + (3 [in bias] + 1 [out bias]) E``. None if the dense count does not match (then
    the caller keeps the cost fixed)."""
    if len(shape) != 3:
        return None
    e, heads = module.embed_dim, module.num_heads
    tokens = shape[1] if module.batch_first else shape[0]
    in_bias = module.in_proj_bias is not None
    out_bias = module.out_proj.bias is not None
    per_sample_a, per_sample_b = 4.0 * tokens, 2.0 * tokens + 3.0 * tokens * in_bias + 2.0 * tokens**2
    per_sample_d = float(heads * tokens**2)
    per_sample = per_sample_a * e * e + per_sample_b * e + per_sample_d
    batch = round(macs / per_sample) if per_sample else 0
    param_b = 3.0 * in_bias + 1.0 * out_bias
    if batch < 1 or abs(batch * per_sample - macs) > 0.5 or abs(4.0 * e * e + param_b * e - params) > 0.5:
        return None
    return (
        Cost(batch * per_sample_a, batch * per_sample_b, 0, batch * per_sample_d, index, index),
        Cost(4.0, param_b, 0, 0, index, index),
    )


def _bias_macs_per_channel(module: nn.Module, macs: float, in_total: int, out_total: int) -> float:
    """torch-pruning counts one MAC per output element for a bias: the output's spatial size."""
    if isinstance(module, nn.Linear):
        return 1.0  # once per output feature, however many tokens
    assert isinstance(module, nn.modules.conv._ConvNd)
    kernel = math.prod(module.kernel_size)
    per_position = kernel * in_total * (out_total // module.groups) + out_total
    return macs / per_position  # = batch * output positions
