"""Quantisation-aware fine-tuning (QAT): fake-quantised layers that train.

:func:`prepare_qat` makes a fake-quantised copy of a model: every BatchNorm that follows a
convolution (or linear layer) is folded into it, and every ``Conv1d/2d/3d`` and ``Linear`` is
wrapped in a :class:`FakeQuantLayer` that rounds, in the forward pass, what the INT8 file will
round: its input activation (per tensor, the target scheme's type and zero point), its weights
(per output channel, symmetric int8 in [-127, 127]), its bias (to the int32 grid of input
scale x weight scale) and its output activation (ONNX Runtime fuses a convolution into an integer
kernel only when its output is quantised), except for the model's outputs and for a layer followed
by a ReLU whose output only quantised layers read: that output is rounded after the ReLU, by its
readers' input grid (:func:`rounded_after_relu`).
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
from collections.abc import Callable, Sequence
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
    "LayerQuant",
    "fake_quantize",
    "float_copy",
    "fold_batchnorm",
    "init_activation_ranges",
    "prepare_qat",
    "qat_layers",
    "rounded_after_relu",
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
    output_scale: float | None
    output_zero_point: int | None


class FakeQuantLayer(nn.Module):
    """A convolution or linear layer that computes what its INT8 version will.

    Attributes:
        layer: the float layer (its weights are the ones trained).
        qmin, qmax: the activation grid (``[0, 255]`` for uint8, ``[-128, 127]`` for int8).
        scheme: the scheme's name.
        symmetric: activations with zero point 0.
        quantize_output: round the output too (ONNX Runtime fuses a convolution into an integer
            kernel only when its output is quantised); off for the model's outputs and for a layer
            whose readers round it after a ReLU (:func:`prepare_qat`).
        input_scale, output_scale: activation scales (parameters; frozen unless learnt).
        input_zero_point, output_zero_point: zero points (buffers, fixed at initialisation).
    """

    input_zero_point: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(self, layer: nn.Module, scheme: QuantScheme, *, learn_scales: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.scheme = scheme.name
        self.qmin, self.qmax = _ACTIVATION_GRID[scheme.activation_type]
        self.symmetric = scheme.activation_symmetric
        self.quantize_output = True
        self.input_scale = nn.Parameter(torch.ones(()), requires_grad=learn_scales)
        self.output_scale = nn.Parameter(torch.ones(()), requires_grad=learn_scales)
        self.register_buffer("input_zero_point", torch.zeros(()))
        self.register_buffer("output_zero_point", torch.zeros(()))
        # Set while calibrating: the layer runs in float and hands this its input and output.
        self.observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight  # type: ignore[return-value]  # Conv or Linear

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias  # type: ignore[return-value]

    def set_range(self, which: str, low: float, high: float) -> None:
        """Set the ``input`` or ``output`` scale and zero point so the grid covers ``[low, high]``
        (always including 0, which must stay exact: padding, ReLU's zeros)."""
        low, high = min(low, 0.0), max(high, 0.0)
        if self.symmetric:
            scale = max(-low, high) / self.qmax
            zero_point = 0
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            zero_point = (
                int(np.clip(round(self.qmin - low / scale), self.qmin, self.qmax)) if scale > 0 else 0
            )
        scale = scale if scale > _SMALLEST_SCALE else 1.0  # a constant-zero tensor
        with torch.no_grad():
            getattr(self, f"{which}_scale").fill_(scale)
            getattr(self, f"{which}_zero_point").fill_(zero_point)

    def _activation(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        scale = scale.clamp_min(_SMALLEST_SCALE)
        if scale.requires_grad:
            scale = _scaled_gradient(scale, (x[0].numel() * self.qmax) ** -0.5)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)

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
            output_scale=float(self.output_scale.clamp_min(_SMALLEST_SCALE))
            if self.quantize_output
            else None,
            output_zero_point=int(self.output_zero_point) if self.quantize_output else None,
        )


def qat_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    """The fake-quantised layers of a :func:`prepare_qat` model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLayer)}


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a :func:`prepare_qat` model with each fake-quantised layer replaced by its float
    layer (BatchNorm stays folded), on the CPU in eval mode."""
    copied = copy.deepcopy(model).cpu().eval()
    for name, layer in qat_layers(copied).items():
        _set_module(copied, name, layer.layer)
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
) -> nn.Module:
    """A fake-quantised copy of ``model`` (``model`` is not changed), in eval mode.

    Args:
        model: a float model (its BatchNorms folded into the copy, see :func:`fold_batchnorm`).
        example: one input batch (finds BatchNorm pairs and the model's output layers).
        scheme: a name in :data:`calibration.schemes.SCHEMES` (``u8s8`` for ONNX Runtime's CPU,
            ``s8s8`` for TensorRT) or the scheme.
        learn_scales: activation scales are parameters that train (else frozen).

    Returns:
        The copy; its activation scales are 1 until :func:`init_activation_ranges` sets them.

    Raises:
        UserError: an unknown scheme, BatchNorm that cannot be folded, or nothing to quantise.
    """
    chosen = scheme if isinstance(scheme, QuantScheme) else SCHEMES.get(scheme)
    qat = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(qat, example)
    layers = [(n, m) for n, m in qat.named_modules() if isinstance(m, _QUANTISABLE)]
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
    for layer in rounded_after_relu(qat):
        layer.quantize_output = False
    return qat


#: Activations an INT8 runtime folds into the quantisation after them (ONNX Runtime removes a
#: Relu, or a Clip whose bounds contain the grid, before QuantizeLinear; TensorRT fuses them).
_RELUS = (nn.ReLU, nn.ReLU6)


class _LayerTracer(fx.Tracer):
    """Traces a QAT model with its quantised layers and ReLUs as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (FakeQuantLayer, *_RELUS)) or super().is_leaf_module(m, module_qualified_name)


def rounded_after_relu(model: nn.Module) -> list[FakeQuantLayer]:
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
    for part, graph in _traced_parts(model):
        modules = dict(part.named_modules())

        def module(node: fx.Node, modules: dict[str, nn.Module] = modules) -> nn.Module | None:
            return modules.get(str(node.target)) if node.op == "call_module" else None

        for node in graph.nodes:
            layer = module(node)
            if not isinstance(layer, FakeQuantLayer):
                continue
            end = node
            while len(end.users) == 1 and isinstance(module(next(iter(end.users))), nn.Identity):
                end = next(iter(end.users))  # a folded BatchNorm
            users = list(end.users)
            if len(users) != 1 or not isinstance(module(users[0]), _RELUS):
                continue
            readers = list(users[0].users)
            if readers and all(isinstance(module(r), FakeQuantLayer) for r in readers):
                found.append(layer)
    return found


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
    """Set every fake-quantised layer's activation scales from the float model's values on
    ``batches`` (the layers run in float meanwhile), with ``method``'s range
    (:func:`calibration.ranges.compute_range`): a pass for each tensor's minimum and maximum,
    and for any other method a second one that fills its histogram (nothing grows with the
    number of images).

    Returns:
        ``{layer: {"input": (low, high)[, "output": (low, high)]}}``, the ranges set.

    Raises:
        UnknownNameError: an unknown method.
        UserError: no batches.
    """
    if method not in range_methods():
        raise UnknownNameError("calibration method", method, range_methods())
    if not batches:
        raise UserError("QAT needs calibration images to initialise its activation ranges; got none")
    layers = qat_layers(model)
    tensors = [(name, which) for name, layer in layers.items() for which in _observed(layer)]
    lows = {key: float("inf") for key in tensors}
    highs = {key: float("-inf") for key in tensors}

    def extremes(key: tuple[str, str], values: torch.Tensor) -> None:
        lows[key] = min(lows[key], float(values.min()))
        highs[key] = max(highs[key], float(values.max()))

    _observe_all(model, layers, batches, extremes)
    found = {key: (lows[key], highs[key]) for key in tensors}
    if method != "minmax":
        histograms = {
            key: Histogram(lo, hi, np.zeros(BINS), Histogram.edges_for(lo, hi))
            for key, (lo, hi) in found.items()
        }
        _observe_all(model, layers, batches, lambda key, values: histograms[key].add(values.cpu().numpy()))
        found = {key: compute_range(method, histograms[key], percentile) for key in tensors}
    ranges: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in layers}
    for (name, which), (low, high) in found.items():
        layers[name].set_range(which, low, high)
        ranges[name][which] = (low, high)
    return ranges


def _observed(layer: FakeQuantLayer) -> tuple[str, ...]:
    return ("input", "output") if layer.quantize_output else ("input",)


def _observe_all(
    model: nn.Module,
    layers: dict[str, FakeQuantLayer],
    batches: Sequence[torch.Tensor],
    record: Callable[[tuple[str, str], torch.Tensor], None],
) -> None:
    """Run ``batches`` through the float layers (eval mode), handing each quantised tensor to
    ``record``."""

    def observer(name: str, layer: FakeQuantLayer) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def observe(x: torch.Tensor, out: torch.Tensor) -> None:
            record((name, "input"), x)
            if layer.quantize_output:
                record((name, "output"), out)

        return observe

    was_training = model.training
    model.eval()
    try:
        for name, layer in layers.items():
            layer.observe = observer(name, layer)
        for x in batches:
            model(x)
    finally:
        for layer in layers.values():
            layer.observe = None
        model.train(was_training)
