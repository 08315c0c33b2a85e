"""Quantisation-aware fine-tuning (QAT): fake-quantised layers that train.

:func:`prepare_qat` makes a fake-quantised copy of a model: every BatchNorm that follows a
convolution (or linear layer) is folded into it, and every ``Conv1d/2d/3d`` and ``Linear`` is
wrapped in a :class:`FakeQuantLayer` that rounds, in the forward pass, what the INT8 file will
round: its input activation (per tensor, the target scheme's type and zero point), its weights
(per output channel, symmetric int8 in [-127, 127]), its bias (to the int32 grid of input
scale x weight scale) and its output activation (ONNX Runtime fuses a convolution into an integer
kernel only when its output is quantised), except for the model's outputs and for a layer followed
by a ReLU whose output only quantised layers read: that output is rounded after the ReLU, by its
readers' input grid (:func:`_rounded_after_relu`). A residual addition computed by a block module
(a ResNet or MobileNetV2 block) is rounded too, after its ReLU if one follows, with both of its
inputs, by a :class:`FakeQuantOutput` on the module that returns the value (a forward hook), so the
runtime adds integers (:func:`_round_additions`); the quantised layers that read such a value share
its grid.
Rounding passes the gradient straight through (zero outside the clipped range); activation
scales are initialised from the values the layers see on calibration images
(:func:`init_activation_ranges`, any method of :mod:`calibration.ranges`) and can be learnt
(LSQ, Esser et al. 2020, with its gradient scale). The caller trains the copy with its own loop
and loss; :func:`calibration.qat_export.export_qat` writes it as a Q/DQ file with the trained
scales.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from calibration.ranges import BINS, Histogram, compute_range, range_methods
from calibration.schemes import SCHEMES, QuantScheme
from exporters.errors import ExportError, UnknownNameError, UserError
from exporters.outputs import as_tuple

__all__ = [
    "FakeQuantLayer",
    "FakeQuantOutput",
    "LayerQuant",
    "fake_quantize",
    "float_copy",
    "float_layers",
    "fold_batchnorm",
    "init_activation_ranges",
    "prepare_qat",
    "qat_layers",
    "qat_outputs",
    "weight_scales",
]

log = logging.getLogger(__name__)

#: Symmetric int8 weights: [-127, 127], so that -w and w round to opposite integers.
WEIGHT_MAX = 127
_ACTIVATION_GRID = {"uint8": (0, 255), "int8": (-128, 127)}
_SMALLEST_SCALE = 1e-8
_INT32_MAX = 2**31 - 1
_QUANTISABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even, as ONNX QuantizeLinear), gradient passed straight through."""
    return t + (torch.round(t) - t).detach()


def _scaled_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` in the forward pass, ``factor`` times its gradient in the backward pass."""
    return (t - t * factor).detach() + t * factor


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` with a straight-through gradient for ``x`` (zero
    where it is clipped) and LSQ's gradient for ``scale``."""
    q = torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """One symmetric scale per output channel (axis 0): its largest magnitude / 127 (1 for an
    all-zero channel). Not learnt: the weights move under it."""
    amax = weight.detach().abs().flatten(1).amax(1)
    return torch.where(amax > 0, amax / WEIGHT_MAX, torch.ones_like(amax))


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


@dataclass
class LayerQuant:
    """What one layer's Q/DQ nodes hold, computed with the same torch ops as its forward pass."""

    weight: np.ndarray  # float weights, to find the layer's node in the exported graph
    weight_int8: np.ndarray
    weight_scale: np.ndarray
    bias: np.ndarray | None
    bias_int32: np.ndarray | None
    bias_scale: np.ndarray | None
    activation_type: str  # "uint8" or "int8"
    int32_bias: bool  # bias as int32 behind DequantizeLinear, else the rounded float values
    input_scale: float
    input_zero_point: int
    input_rounded_before: bool  # what it reads is already on its input grid (a FakeQuantOutput's)
    output_scale: float | None
    output_zero_point: int | None


class _ActivationGrid(nn.Module):
    """What every activation rounding shares: the scheme's grid, and scales set from a range."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme.name
        self.qmin, self.qmax = _ACTIVATION_GRID[scheme.activation_type]
        self.symmetric = scheme.activation_symmetric

    def set_range(self, which: str, low: float, high: float) -> None:
        """Set the ``which`` (``input`` or ``output``) scale and zero point so the grid covers
        ``[low, high]`` (always including 0, which must stay exact: padding, ReLU's zeros)."""
        low, high = min(low, 0.0), max(high, 0.0)
        if self.symmetric:
            scale = max(-low, high) / self.qmax
            zero_point = 0
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            zero_point = (
                int(np.clip(round(self.qmin - low / scale), self.qmin, self.qmax)) if scale > 0 else 0
            )
        if scale <= _SMALLEST_SCALE:
            # A constant-zero tensor (a ReLU that never fired on these images): any scale keeps
            # 0 exact, and a small one keeps the grid inside a ReLU6's bound, so ONNX Runtime
            # can still drop the Clip and run the convolution before it as an integer kernel
            # (a grid reaching 255 kept the Clip and left the convolution in float).
            scale = 1.0 / self.qmax
        with torch.no_grad():
            getattr(self, f"{which}_scale").fill_(scale)
            getattr(self, f"{which}_zero_point").fill_(zero_point)

    def _activation(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        scale = scale.clamp_min(_SMALLEST_SCALE)
        if scale.requires_grad:
            scale = _scaled_gradient(scale, (x[0].numel() * self.qmax) ** -0.5)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)


class FakeQuantLayer(_ActivationGrid):
    """A convolution or linear layer that computes what its INT8 version will.

    Attributes:
        layer: the float layer (its weights are the ones trained).
        qmin, qmax: the activation grid (``[0, 255]`` for uint8, ``[-128, 127]`` for int8).
        scheme: the scheme's name.
        symmetric: activations with zero point 0.
        quantize_input: round the input; off when the tensor it reads is already rounded, to the
            same grid, by a :class:`FakeQuantOutput` (whose scale and zero point it then shares).
        quantize_output: round the output too (ONNX Runtime fuses a convolution into an integer
            kernel only when its output is quantised); off for the model's outputs and for a layer
            whose output is rounded after a ReLU (:func:`prepare_qat`).
        input_scale, output_scale: activation scales (parameters; frozen unless learnt).
        input_zero_point, output_zero_point: zero points (buffers, fixed at initialisation).
    """

    input_zero_point: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(self, layer: nn.Module, scheme: QuantScheme, *, learn_scales: bool = True) -> None:
        super().__init__(scheme)
        self.layer = layer
        self.quantize_input = True
        self.quantize_output = True
        self.input_scale = nn.Parameter(torch.ones(()), requires_grad=learn_scales)
        self.output_scale = nn.Parameter(torch.ones(()), requires_grad=learn_scales)
        self.register_buffer("input_zero_point", torch.zeros(()))
        self.register_buffer("output_zero_point", torch.zeros(()))
        # Set while calibrating: the layer runs in float and hands this its input and output.
        self.observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def share_input_grid(self, scale: nn.Parameter, zero_point: torch.Tensor) -> None:
        """Read an input another rounding already puts on a grid: take that grid's scale and zero
        point (the same tensors, trained once) and stop rounding the input again."""
        self.input_scale = scale
        self.input_zero_point = zero_point
        self.quantize_input = False

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight  # type: ignore[return-value]  # Conv or Linear

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias  # type: ignore[return-value]

    def _quantized_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Fake-quantised weight and bias, with the weight scales and the bias scales."""
        weight = self.weight
        w_scale = weight_scales(weight)
        w_step = _per_channel(w_scale, weight)
        w = torch.clamp(_round_ste(weight / w_step), -WEIGHT_MAX, WEIGHT_MAX) * w_step
        b_scale = self.input_scale.detach().clamp_min(_SMALLEST_SCALE) * w_scale
        bias = self.bias
        b = None if bias is None else _round_ste(bias / b_scale) * b_scale
        return w, b, w_scale, b_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            out = self.layer(x)
            self.observe(x.detach(), out.detach())
            return out
        if self.quantize_input:
            x = self._activation(x, self.input_scale, self.input_zero_point)
        weight, bias, _, _ = self._quantized_parameters()
        if isinstance(self.layer, nn.Linear):
            out = F.linear(x, weight, bias)
        else:
            out = self.layer._conv_forward(x, weight, bias)  # type: ignore[operator]  # Conv1d/2d/3d
        if self.quantize_output:
            out = self._activation(out, self.output_scale, self.output_zero_point)
        return out

    @torch.no_grad()
    def quantization(self) -> LayerQuant:
        """The integer weights, bias and every scale and zero point, as the forward pass uses them."""
        weight = self.weight
        _, _, w_scale, b_scale = self._quantized_parameters()
        w_int = torch.clamp(torch.round(weight / _per_channel(w_scale, weight)), -WEIGHT_MAX, WEIGHT_MAX)
        bias = self.bias
        if bias is not None and float(torch.round(bias / b_scale).abs().max()) > _INT32_MAX:
            raise ExportError(
                f"its bias does not fit the int32 grid of input scale x weight scale (input scale "
                f"{float(self.input_scale):.3g}): training drove the activation scale to nothing; "
                "lower the QAT learning rate (quantize.qat.lr) or freeze the scales "
                "(quantize.qat.learn_scales: false)"
            )
        return LayerQuant(
            weight=weight.cpu().numpy(),
            weight_int8=w_int.to(torch.int8).cpu().numpy(),
            weight_scale=w_scale.cpu().numpy().astype(np.float32),
            bias=None if bias is None else bias.cpu().numpy(),
            bias_int32=None if bias is None else torch.round(bias / b_scale).to(torch.int32).cpu().numpy(),
            bias_scale=None if bias is None else b_scale.cpu().numpy().astype(np.float32),
            activation_type="uint8" if self.qmin == 0 else "int8",
            # ONNX Runtime fuses a convolution only with an int32 bias behind DequantizeLinear;
            # TensorRT takes a float bias (its DequantizeLinear reads 8-bit inputs).
            int32_bias=not self.symmetric,
            input_scale=float(self.input_scale.clamp_min(_SMALLEST_SCALE)),
            input_zero_point=int(self.input_zero_point),
            input_rounded_before=not self.quantize_input,
            output_scale=float(self.output_scale.clamp_min(_SMALLEST_SCALE))
            if self.quantize_output
            else None,
            output_zero_point=int(self.output_zero_point) if self.quantize_output else None,
        )


class FakeQuantOutput(_ActivationGrid):
    """Rounds what a module returns to one per-tensor activation grid (a residual addition's
    output, or an activation such an addition reads); held by that module as ``qat_output`` and
    applied by a forward hook (:func:`_round_additions`).

    Attributes:
        output_scale: the scale (a parameter; frozen unless learnt).
        output_zero_point: the zero point (a buffer, fixed at initialisation).
        exported: when set (by :func:`float_copy`), the :meth:`rounding` constants to round with
            ``quantized_decomposed`` quantise/dequantise ops, which the ONNX exporter writes as
            QuantizeLinear/DequantizeLinear.
    """

    output_zero_point: torch.Tensor

    def __init__(self, scheme: QuantScheme, *, learn_scales: bool = True) -> None:
        super().__init__(scheme)
        self.output_scale = nn.Parameter(torch.ones(()), requires_grad=learn_scales)
        self.register_buffer("output_zero_point", torch.zeros(()))
        self.exported: tuple[float, int, int, int] | None = None
        self.observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            self.observe(x.detach(), x.detach())
            return x
        if self.exported is not None:
            return _exported_rounding(x, self.exported)
        return self._activation(x, self.output_scale, self.output_zero_point)

    def rounding(self) -> tuple[float, int, int, int]:
        """Scale, zero point, lowest and highest grid value, as the forward pass uses them."""
        return (
            float(self.output_scale.detach().clamp_min(_SMALLEST_SCALE)),
            int(self.output_zero_point),
            self.qmin,
            self.qmax,
        )


def _exported_rounding(x: torch.Tensor, rounding: tuple[float, int, int, int]) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in ops the dynamo ONNX exporter writes as those
    nodes (``rounding``: constants, so nothing is read from a tensor while it traces)."""
    import torch.ao.quantization.fx._decomposed  # registers quantized_decomposed

    scale, zero_point, qmin, qmax = rounding
    dtype = torch.uint8 if qmin == 0 else torch.int8
    ops = torch.ops.quantized_decomposed
    q = ops.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    return ops.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)


def _round_output(module: nn.Module, _: Any, out: torch.Tensor) -> torch.Tensor:
    """The forward hook of a module whose output is rounded (a function, so copies of the model
    call their own ``qat_output``)."""
    return cast(FakeQuantOutput, module.qat_output)(out)


def qat_outputs(model: nn.Module) -> dict[str, FakeQuantOutput]:
    """The rounded module outputs of a :func:`prepare_qat` model, by the rounding's name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantOutput)}


def qat_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    """The fake-quantised layers of a :func:`prepare_qat` model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLayer)}


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    """A :func:`prepare_qat` model's convolutions and linear layers that stay float (its
    ``keep_float``), by name."""
    wrapped = tuple(f"{name}." for name in qat_layers(model))
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _QUANTISABLE) and not name.startswith(wrapped)
    }


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a :func:`prepare_qat` model with each fake-quantised layer replaced by its float
    layer (BatchNorm stays folded) and the rounded module outputs in ops the ONNX exporter
    writes as QuantizeLinear/DequantizeLinear, on the CPU in eval mode."""
    copied = copy.deepcopy(model).cpu().eval()
    for name, layer in qat_layers(copied).items():
        _set_module(copied, name, layer.layer)
    for rounding in qat_outputs(copied).values():
        rounding.exported = rounding.rounding()
    return copied


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, atol: float = 1e-4) -> list[str]:
    """Fold, in place, each BatchNorm that directly follows a convolution or linear layer into
    that layer (its running statistics become weights and bias; the BatchNorm becomes an
    identity), as an INT8 file computes it. Pairs are found by running ``example`` (eval mode).

    Returns:
        The names of the folded BatchNorms.

    Raises:
        UserError: the folded model's outputs differ from the model's by more than ``atol``
            (a convolution's output also read by something other than its BatchNorm).
    """
    was_training = model.training
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after_layer(module: nn.Module, _: Any, out: torch.Tensor) -> None:
        produced[id(out)] = (module, out)  # the tensor is kept alive so its id is not reused

    def before_bn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        found = produced.get(id(inputs[0]))
        if found is not None and module.track_running_stats and module.running_mean is not None:  # type: ignore[union-attr]
            pairs.append((found[0], module))

    hooks = [m.register_forward_hook(after_layer) for m in model.modules() if isinstance(m, _QUANTISABLE)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in model.modules() if isinstance(m, _BATCHNORMS)]
    try:
        reference = [t.clone() for t in as_tuple(model(example))]
    finally:
        for hook in hooks:
            hook.remove()
    for layer, bn in pairs:
        _fold(layer, bn)  # type: ignore[arg-type]
        _set_module(model, names[id(bn)], nn.Identity())
    folded = as_tuple(model(example))
    model.train(was_training)
    worst = max(float((a - b).abs().max()) for a, b in zip(reference, folded))
    if worst > atol:
        raise UserError(
            f"folding BatchNorm into the layers before it changed the model's outputs by {worst:.3g}: "
            "a layer's output is read both by its BatchNorm and elsewhere; QAT needs BatchNorm that "
            "follows its convolution alone"
        )
    return [names[id(bn)] for _, bn in pairs]


def _fold(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d) -> None:
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    std = torch.sqrt(var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    layer.weight.mul_(_per_channel(factor, layer.weight))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(std)
    layer.bias = nn.Parameter(((bias - mean) * factor + beta).detach().clone())


def prepare_qat(
    model: nn.Module,
    example: torch.Tensor,
    scheme: str | QuantScheme,
    *,
    learn_scales: bool = True,
    keep_float: Collection[str] = (),
) -> nn.Module:
    """A fake-quantised copy of ``model`` (``model`` is not changed), in eval mode.

    Args:
        model: a float model (its BatchNorms folded into the copy, see :func:`fold_batchnorm`).
        example: one input batch (finds BatchNorm pairs and the model's output layers).
        scheme: a name in :data:`calibration.schemes.SCHEMES` (``u8s8`` for ONNX Runtime's CPU,
            ``s8s8`` for TensorRT) or the scheme.
        learn_scales: activation scales are parameters that train (else frozen).
        keep_float: names of layers (as ``model.named_modules()`` names them) left in float:
            mixed precision (:func:`calibration.qat_select.keep_sensitive_float`). A value they
            read or write stays on a grid only where a quantised layer or an addition needs it.

    Returns:
        The copy; its activation scales are 1 until :func:`init_activation_ranges` sets them.

    Raises:
        UserError: an unknown scheme, BatchNorm that cannot be folded, nothing to quantise, or
            a ``keep_float`` name that is not a quantisable layer of the model.
    """
    chosen = scheme if isinstance(scheme, QuantScheme) else SCHEMES.get(scheme)
    qat = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(qat, example)
    quantisable = [(n, m) for n, m in qat.named_modules() if isinstance(m, _QUANTISABLE)]
    unknown = sorted(set(keep_float) - {n for n, _ in quantisable})
    if unknown:
        raise UserError(
            f"QAT cannot keep {', '.join(unknown)} in float: not a Conv1d/2d/3d or Linear layer of the model"
        )
    layers = [(n, m) for n, m in quantisable if n not in keep_float]
    if not layers:
        raise UserError("QAT found no Conv1d/2d/3d or Linear layer to quantise in the model")
    for name, module in layers:
        _set_module(qat, name, FakeQuantLayer(module, chosen, learn_scales=learn_scales))
    # The model's own outputs stay float (rounding logits makes ties of the largest ones).
    wrapped = qat_layers(qat)
    outputs: dict[int, FakeQuantLayer] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _, out: outputs.__setitem__(id(out), mod))
        for m in wrapped.values()
    ]
    try:
        with torch.no_grad():
            for layer in wrapped.values():
                layer.observe = _ignore
            final = as_tuple(qat(example))
            for t in final:
                if id(t) in outputs:
                    outputs[id(t)].quantize_output = False
    finally:
        for hook in hooks:
            hook.remove()
        for layer in wrapped.values():
            layer.observe = None
    for traced in _traced(qat):  # each part traced once, for both passes
        for layer in _rounded_after_relu(traced):
            layer.quantize_output = False
        _round_additions(traced, chosen, learn_scales=learn_scales)
    return qat


#: Activations an INT8 runtime folds into the quantisation after them (ONNX Runtime removes a
#: Relu, or a Clip whose bounds contain the grid, before QuantizeLinear; TensorRT fuses them).
_RELUS = (nn.ReLU, nn.ReLU6)


class _LayerTracer(fx.Tracer):
    """Traces a QAT model with its quantised layers and ReLUs as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (FakeQuantLayer, *_RELUS)) or super().is_leaf_module(m, module_qualified_name)


def _rounded_after_relu(traced: _Traced) -> list[FakeQuantLayer]:
    """The quantised layers whose output only a ReLU (or ReLU6) module reads, through folded
    BatchNorms, and whose activated output only quantised layers read.

    Those need no rounding of their own: the readers round the activated values to their input
    grid, which starts at 0, and the INT8 file then holds ``Conv -> Relu -> QuantizeLinear``,
    which ONNX Runtime fuses into one integer convolution writing that grid (a rounding at the
    convolution's output as well leaves ``DequantizeLinear -> Clip -> QuantizeLinear`` between
    the layers, unfused). An activation something else also reads (a residual addition) keeps
    the rounding before it: with a float reader the runtime could not fold the ReLU, and the
    convolution would stay in float. A model torch.fx cannot trace keeps every rounding.
    """
    found = []
    for node in traced.graph.nodes:
        layer = traced.module(node)
        if not isinstance(layer, FakeQuantLayer):
            continue
        end = node
        while len(end.users) == 1 and isinstance(traced.module(next(iter(end.users))), nn.Identity):
            end = next(iter(end.users))  # a folded BatchNorm
        users = list(end.users)
        if len(users) != 1 or not isinstance(traced.module(users[0]), _RELUS):
            continue
        readers = list(users[0].users)
        if readers and all(isinstance(traced.module(r), FakeQuantLayer) for r in readers):
            found.append(layer)
    return found


_ADDITIONS = {operator.add, operator.iadd, torch.add}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _round_additions(traced: _Traced, scheme: QuantScheme, *, learn_scales: bool) -> None:
    """Round the residual additions of a model part being prepared for QAT, and their inputs, so
    the INT8 file adds integers (in place).

    An addition of two tensors whose result (or the ReLU applied to it alone) is what a module
    returns, a ResNet or MobileNetV2 block, gets a :class:`FakeQuantOutput` on that module. Its
    inputs are rounded too: a quantised layer's output already is, another rounded addition's
    is, and any other module's output gets a :class:`FakeQuantOutput` of its own (the layer
    before a rounded ReLU stops rounding its output: the runtime folds the ReLU into the
    rounding after it). A quantised layer that reads a rounded value (a module output rounded
    here, or another layer's rounded output) shares its scale and zero point and does not round
    again, so the file holds one Q/DQ pair per value. ONNX Runtime then fuses each
    ``DQ, DQ -> Add -> Q`` into one integer addition. An addition no hook can reach (written in
    the top-level ``forward``, or reading the model's input) stays float, as do the model's
    outputs.
    """
    for value, holder in traced.rounding_points().items():
        target = traced.modules[holder]
        rounding = FakeQuantOutput(scheme, learn_scales=learn_scales)
        target.add_module("qat_output", rounding)
        target.register_forward_hook(_round_output)
        if isinstance(traced.module(value), _RELUS):  # the layer before need not round its output
            before = traced.source(cast(fx.Node, value.args[0]))
            layer = traced.module(before)
            if isinstance(layer, FakeQuantLayer) and traced.only_reader(before, value):
                layer.quantize_output = False
        for reader in traced.layers_reading(value):
            reader.share_input_grid(rounding.output_scale, rounding.output_zero_point)
    for node in traced.graph.nodes:  # a layer reading another's rounded output: one grid, not two
        layer = traced.module(node)
        if isinstance(layer, FakeQuantLayer) and layer.quantize_output:
            for reader in traced.layers_reading(node):
                reader.share_input_grid(layer.output_scale, layer.output_zero_point)


class _Traced:
    """A traced model part: its modules by name, how often each is called, the modules whose
    ``forward`` produced each node, and the questions the rounding passes ask of its nodes."""

    def __init__(self, part: nn.Module, graph: fx.Graph) -> None:
        self.graph = graph
        self.modules = dict(part.named_modules())
        self.calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        # The modules whose forward produced each node, outermost first.
        self.paths = {
            n: [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()] for n in graph.nodes
        }

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def source(self, node: fx.Node) -> fx.Node:
        """The node whose value ``node`` passes on unchanged (through folded BatchNorms and
        identity shortcuts)."""
        while isinstance(self.module(node), nn.Identity) and node.args:
            node = cast(fx.Node, node.args[0])
        return node

    def layers_reading(self, value: fx.Node) -> list[FakeQuantLayer]:
        """The quantised layers whose input is ``value`` (directly or through identities)."""
        found, todo = [], [value]
        while todo:
            node = todo.pop()
            for user in node.users:
                reader = self.module(user)
                if isinstance(reader, FakeQuantLayer) and user.args[0] is node:
                    found.append(reader)
                elif isinstance(reader, nn.Identity):
                    todo.append(user)
        return found

    def only_reader(self, producer: fx.Node, value: fx.Node) -> bool:
        """Whether ``value`` alone reads ``producer``'s output (through folded BatchNorms)."""
        node = producer
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node is value:
                return True
            if not isinstance(self.module(node), nn.Identity):
                return False
        return False

    def rounding_points(self) -> dict[fx.Node, str]:
        """The values to round, each with the module whose forward hook rounds it."""
        points: dict[fx.Node, str] = {}
        for node in self.graph.nodes:
            if not (node.op == "call_function" and node.target in _ADDITIONS and len(node.args) == 2):
                continue
            if not all(isinstance(a, fx.Node) for a in node.args):
                continue
            out = node
            if len(node.users) == 1 and isinstance(self.module(next(iter(node.users))), _RELUS):
                out = next(iter(node.users))
            holder = self.returning_module(out)
            if holder is None or any(u.op == "output" for u in out.users):
                continue
            todo = {out: holder}
            for value in (self.source(cast(fx.Node, a)) for a in node.args):
                layer = self.module(value)
                if value in points or (isinstance(layer, FakeQuantLayer) and layer.quantize_output):
                    continue  # already on a grid
                found = self.returning_module(value)
                if found is None:
                    break
                todo[value] = found
            else:
                points.update(todo)
        return points

    def returning_module(self, value: fx.Node) -> str | None:
        """The name of a module a forward hook can round ``value`` on: the module the node calls
        (a leaf called once), else the innermost module whose ``forward`` computes it, if
        ``value`` is the only thing that leaves it. ``None`` for a value of the top-level
        ``forward`` and for a quantised layer (it rounds its own output)."""
        if value.op == "call_module":
            name = str(value.target)
            if self.calls[name] == 1 and self._hookable(name):
                return name
        paths = self.paths[value]
        if value.op == "call_module":
            paths = paths[:-1]  # the leaf itself
        if not paths or not self._hookable(paths[-1]):
            return None
        name = paths[-1]
        inside = {n for n, paths in self.paths.items() if name in paths}
        leaving = {n for n in inside if any(u not in inside for u in n.users)}
        return name if leaving == {value} else None

    def _hookable(self, name: str) -> bool:
        # A container's forward would call a module added to it.
        target = self.modules.get(name)
        return target is not None and not isinstance(target, (FakeQuantLayer, *_CONTAINERS))


def _traced(model: nn.Module) -> list[_Traced]:
    """The model, or else those of its children torch.fx traces, each with its graph."""
    return [_Traced(part, graph) for part, graph in _traced_parts(model)]


def _traced_parts(model: nn.Module) -> list[tuple[nn.Module, fx.Graph]]:
    """The model and its graph, or else those of its children torch.fx traces (a wrapper that
    checks what its network returns, like the built-in normalising classifier, does not trace)."""
    graph = _trace(model)
    if graph is not None:
        return [(model, graph)]
    parts = [(child, g) for child in model.children() if (g := _trace(child)) is not None]
    if not parts:
        log.info("QAT: the model does not trace with torch.fx; every layer rounds its own output")
    return parts


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _LayerTracer().trace(module)
    except Exception:  # data-dependent control flow and the like: nothing to gain, nothing lost
        return None


def _ignore(x: torch.Tensor, out: torch.Tensor) -> None:
    return None


@torch.no_grad()
def init_activation_ranges(
    model: nn.Module, batches: Sequence[torch.Tensor], *, method: str = "minmax", percentile: float = 99.99
) -> dict[str, dict[str, tuple[float, float]]]:
    """Set every activation scale of a :func:`prepare_qat` model (its layers' and its rounded
    module outputs') from the float model's values on ``batches`` (the roundings are off
    meanwhile), with ``method``'s range (:func:`calibration.ranges.compute_range`): a pass for
    each tensor's minimum and maximum, and for any other method a second one that fills its
    histogram (nothing grows with the number of images). A layer that reads a rounded output
    shares that output's scale.

    Returns:
        ``{name: {"input": (low, high), "output": (low, high)}}``, the ranges set (each rounded
        tensor once: a layer's ``input`` when it rounds it, its ``output`` when it rounds that).

    Raises:
        UnknownNameError: an unknown method.
        UserError: no batches.
    """
    if method not in range_methods():
        raise UnknownNameError("calibration method", method, range_methods())
    if not batches:
        raise UserError("QAT needs calibration images to initialise its activation ranges; got none")
    roundings: dict[str, FakeQuantLayer | FakeQuantOutput] = {**qat_layers(model), **qat_outputs(model)}
    tensors = [(name, which) for name, rounding in roundings.items() for which in _observed(rounding)]
    lows = {key: float("inf") for key in tensors}
    highs = {key: float("-inf") for key in tensors}

    def extremes(key: tuple[str, str], values: torch.Tensor) -> None:
        lows[key] = min(lows[key], float(values.min()))
        highs[key] = max(highs[key], float(values.max()))

    _observe_all(model, roundings, batches, extremes)
    found = {key: (lows[key], highs[key]) for key in tensors}
    if method != "minmax":
        histograms = {
            key: Histogram(lo, hi, np.zeros(BINS), Histogram.edges_for(lo, hi))
            for key, (lo, hi) in found.items()
        }
        _observe_all(model, roundings, batches, lambda key, values: histograms[key].add(values.cpu().numpy()))
        found = {key: compute_range(method, histograms[key], percentile) for key in tensors}
    ranges: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in roundings}
    for (name, which), (low, high) in found.items():
        roundings[name].set_range(which, low, high)
        ranges[name][which] = (low, high)
    return ranges


def _observed(rounding: FakeQuantLayer | FakeQuantOutput) -> tuple[str, ...]:
    """Which of its tensors a rounding sets the scale of."""
    if isinstance(rounding, FakeQuantOutput):
        return ("output",)
    return ("input",) * rounding.quantize_input + ("output",) * rounding.quantize_output


def _observe_all(
    model: nn.Module,
    roundings: dict[str, FakeQuantLayer | FakeQuantOutput],
    batches: Sequence[torch.Tensor],
    record: Callable[[tuple[str, str], torch.Tensor], None],
) -> None:
    """Run ``batches`` through the model in float (eval mode), handing each rounded tensor to
    ``record``."""

    def observer(name: str, observed: tuple[str, ...]) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def observe(x: torch.Tensor, out: torch.Tensor) -> None:
            if "input" in observed:
                record((name, "input"), x)
            if "output" in observed:
                record((name, "output"), out)

        return observe

    was_training = model.training
    model.eval()
    try:
        for name, rounding in roundings.items():
            rounding.observe = observer(name, _observed(rounding))
        for x in batches:
            model(x)
    finally:
        for rounding in roundings.values():
            rounding.observe = None
        model.train(was_training)
