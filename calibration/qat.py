"""Quantisation-aware fine-tuning (QAT): fake-quantised layers that train, and the Q/DQ file
whose scales are the trained ones.

:func:`prepare_qat` makes a fake-quantised copy of a model: every BatchNorm that follows a
convolution (or linear layer) is folded into it, and every ``Conv1d/2d/3d`` and ``Linear`` is
wrapped in a :class:`FakeQuantLayer` that rounds, in the forward pass, what the INT8 file will
round: its input activation (per tensor, the target scheme's type and zero point), its weights
(per output channel, symmetric int8 in [-127, 127]), its bias (to the int32 grid of input
scale x weight scale) and, unless it is an output of the model, its output activation. Rounding passes the
gradient straight through (zero outside the clipped range); activation scales are initialised
from the values the layers see on calibration images (:func:`init_activation_ranges`, any
method of :mod:`calibration.ranges`) and can be learnt (LSQ, Esser et al. 2020, with its
gradient scale). The caller trains the copy with its own loop and loss.

:func:`export_qat` writes the trained copy as the FP32 ONNX file of its float layers with
QuantizeLinear/DequantizeLinear inserted where training rounded, in ONNX Runtime's QDQ layout:
``x -> Q -> DQ -> Conv(DQ(int8 weight), DQ(int32 bias)) -> Q -> DQ``. ONNX Runtime fuses each
such convolution into ``QLinearConv`` (the ``u8s8`` scheme). TensorRT's explicit quantisation
reads the same pattern when activations are symmetric int8 with zero point 0 and the bias is
float (the ``s8s8`` scheme writes it so: the rounded bias values, no int32 DequantizeLinear).
The scales and zero points are the trained ones, so the file computes what the fake-quantised
model computed, up to rounding ties of float accumulation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from calibration.qdq import quantized_node_counts
from calibration.ranges import BINS, Histogram, compute_range, range_methods
from calibration.schemes import SCHEMES, QuantScheme
from exporters.base import InputSpec
from exporters.errors import ExportError, UnknownNameError, UserError
from exporters.onnx import export_onnx, load_onnx
from exporters.outputs import as_tuple

__all__ = [
    "FakeQuantLayer",
    "QatExport",
    "export_qat",
    "fake_quantize",
    "fold_batchnorm",
    "init_activation_ranges",
    "prepare_qat",
    "qat_layers",
]

log = logging.getLogger(__name__)

#: Symmetric int8 weights: [-127, 127], so that -w and w round to opposite integers.
WEIGHT_MAX = 127
_ACTIVATION_GRID = {"uint8": (0, 255), "int8": (-128, 127)}
_SMALLEST_SCALE = 1e-8
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
class _LayerQuant:
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
        quantize_output: round the output too (every layer but the model's outputs: ONNX Runtime
            fuses a convolution into an integer kernel only when its output is quantised).
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
    def quantization(self) -> _LayerQuant:
        """The integer weights, bias and every scale and zero point, as the forward pass uses them."""
        weight = self.weight
        _, _, w_scale, b_scale = self._quantized_parameters()
        w_int = torch.clamp(torch.round(weight / _per_channel(w_scale, weight)), -WEIGHT_MAX, WEIGHT_MAX)
        bias = self.bias
        return _LayerQuant(
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
    return qat


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


@dataclass(frozen=True)
class QatExport:
    """What :func:`export_qat` wrote.

    Attributes:
        path: the Q/DQ ONNX file.
        scheme: the scheme's name (the layers').
        quantized_nodes: count per op type of the nodes that got Q/DQ inputs.
        layers: per fake-quantised layer, the ONNX nodes it became.
        unmatched_nodes: convolutions and matrix products left in float (no trained layer).
    """

    path: Path
    scheme: str
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    layers: dict[str, list[str]] = field(default_factory=dict)
    unmatched_nodes: list[str] = field(default_factory=list)


def export_qat(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_spec: InputSpec,
    opset: int = 18,
    dynamic_batch: bool = True,
    metadata: Mapping[str, Any] | None = None,
    output_names: Sequence[str] | None = None,
) -> QatExport:
    """Write a :func:`prepare_qat` model as a Q/DQ ONNX file with its trained scales.

    The float layers are exported (:func:`exporters.onnx.export_onnx`), then each one's node
    gets QuantizeLinear/DequantizeLinear around its input (and output), an int8 weight and an
    int32 bias behind DequantizeLinear, all from :meth:`FakeQuantLayer.quantization`.

    Args:
        model: the fake-quantised model.
        path: where to write (atomically).
        input_spec, opset, dynamic_batch, output_names: as :func:`exporters.onnx.export_onnx`
            (opset 13 or later: per-channel DequantizeLinear).
        metadata: extra ``metadata_props``; ``precision: int8``, ``quant_scheme`` and
            ``quant_method: qat`` are added.

    Returns:
        A :class:`QatExport`.

    Raises:
        UserError: not a QAT model, or an opset before 13.
        ExportError: a trained layer has no node in the exported graph.
    """
    layers = qat_layers(model)
    if not layers:
        raise UserError("export_qat needs a model from prepare_qat (it has no FakeQuantLayer)")
    if opset < 13:
        raise UserError(f"QAT export needs opset 13 or later (per-channel DequantizeLinear), got {opset}")
    scheme = next(iter(layers.values())).scheme
    float_model = copy.deepcopy(model).cpu().eval()
    for name, layer in qat_layers(float_model).items():
        _set_module(float_model, name, layer.layer)
    quant = {name: layer.quantization() for name, layer in layers.items()}
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="robustprune-qat-") as tmp:
        source = export_onnx(
            float_model,
            Path(tmp) / "float.onnx",
            input_spec=input_spec,
            opset=opset,
            dynamic_batch=dynamic_batch,
            metadata=metadata,
            output_names=output_names,
        )
        proto = load_onnx(source)
    matched, unmatched = _insert_qdq(proto, quant)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        {
            "precision": "int8",
            "quant_scheme": scheme,
            "quant_method": "qat",
            "quant_per_channel": json.dumps(True),
        }
    )
    helper.set_model_props(proto, props)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, str(tmp_path))
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    if unmatched:
        log.warning(
            "QAT export: %d node(s) have no trained layer and stay float: %s", len(unmatched), unmatched
        )
    return QatExport(path, scheme, quantized_node_counts(proto), matched, unmatched)


@dataclass
class _Added:
    """The nodes and initialisers one layer's quantisation adds to the graph."""

    before: list[onnx.NodeProto] = field(default_factory=list)
    after: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def dequantize(self, values: str, scale: str, zero_point: str, out: str, axis: int | None = None) -> None:
        node = helper.make_node("DequantizeLinear", [values, scale, zero_point], [out], name=out)
        if axis is not None:
            node.attribute.append(helper.make_attribute("axis", axis))
        self.before.append(node)

    def qdq(
        self, tensor: str, out: str, prefix: str, scale: float, zero_point: int, dtype: Any
    ) -> list[onnx.NodeProto]:
        """``tensor -> QuantizeLinear -> DequantizeLinear -> out`` (per tensor)."""
        s = self.constant(f"{prefix}_scale", np.array(scale, dtype=np.float32))
        z = self.constant(f"{prefix}_zero_point", np.array(zero_point, dtype=dtype))
        return [
            helper.make_node("QuantizeLinear", [tensor, s, z], [f"{prefix}_q"], name=f"{prefix}_q"),
            helper.make_node("DequantizeLinear", [f"{prefix}_q", s, z], [out], name=f"{prefix}_dq"),
        ]


def _insert_qdq(
    proto: onnx.ModelProto, quant: dict[str, _LayerQuant]
) -> tuple[dict[str, list[str]], list[str]]:
    """Put each layer's Q/DQ nodes into the exported float graph (in place). A layer's node is
    the Conv, Gemm or MatMul whose weight initialiser holds exactly its float weights."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    by_weight: dict[tuple[tuple[int, ...], bytes], list[tuple[str, int]]] = {}
    for name, q in quant.items():
        w = np.ascontiguousarray(q.weight, dtype=np.float32)
        by_weight.setdefault((w.shape, w.tobytes()), []).append((name, 0))
        if w.ndim == 2:  # a linear layer exported as MatMul (or Gemm without transB): [in, out]
            wt = np.ascontiguousarray(w.T)
            by_weight.setdefault((wt.shape, wt.tobytes()), []).append((name, 1))
    graph_outputs = {o.name for o in graph.output}
    matched: dict[str, list[str]] = {name: [] for name in quant}
    unmatched: list[str] = []
    nodes: list[onnx.NodeProto] = []
    added_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type in _QUANTISED_OPS and len(node.input) > 1 else None
        if weight is None:
            nodes.append(node)
            continue
        array = np.ascontiguousarray(numpy_helper.to_array(weight), dtype=np.float32)
        candidates = by_weight.get((array.shape, array.tobytes()), [])
        axis = candidates[0][1] if candidates else None
        if len({c[0] for c in candidates}) != 1 or (
            node.op_type == "Gemm" and axis != (0 if _attr(node, "transB", 0) else 1)
        ):
            unmatched.append(node.name)
            nodes.append(node)
            continue
        name = candidates[0][0]
        added = _quantize_node(
            node, quant[name], int(axis or 0), f"{name}.{len(matched[name])}", graph_outputs
        )
        nodes += [*added.before, node, *added.after]
        added_inits += added.initializers
        matched[name].append(node.name)
    missing = sorted(name for name, found in matched.items() if not found)
    if missing:
        raise ExportError(
            f"QAT export: the trained layers {missing} have no Conv/Gemm/MatMul node holding their "
            "weights in the exported graph; the exporter changed them"
        )
    used = {i for n in nodes for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added_inits])
    return matched, unmatched


_QUANTISED_OPS = ("Conv", "Gemm", "MatMul")


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default


def _quantize_node(
    node: onnx.NodeProto, q: _LayerQuant, axis: int, prefix: str, graph_outputs: set[str]
) -> _Added:
    """The Q/DQ nodes around one Conv/Gemm/MatMul node, which is rewired to read (and write)
    through them."""
    added = _Added()
    act_dtype = np.uint8 if q.activation_type == "uint8" else np.int8
    added.before += added.qdq(
        node.input[0], f"{prefix}.input_dq", f"{prefix}.input", q.input_scale, q.input_zero_point, act_dtype
    )
    node.input[0] = f"{prefix}.input_dq"
    w_int = q.weight_int8 if axis == 0 else np.ascontiguousarray(q.weight_int8.T)
    added.dequantize(
        added.constant(f"{prefix}.weight_int8", w_int),
        added.constant(f"{prefix}.weight_scale", q.weight_scale),
        added.constant(f"{prefix}.weight_zero_point", np.zeros(q.weight_scale.shape, dtype=np.int8)),
        f"{prefix}.weight_dq",
        axis=axis,
    )
    node.input[1] = f"{prefix}.weight_dq"
    bias, bias_scale = q.bias_int32, q.bias_scale
    if len(node.input) > 2 and node.input[2] and bias is not None and bias_scale is not None:
        if q.int32_bias:
            added.dequantize(
                added.constant(f"{prefix}.bias_int32", bias),
                added.constant(f"{prefix}.bias_scale", bias_scale),
                added.constant(f"{prefix}.bias_zero_point", np.zeros(bias.shape, dtype=np.int32)),
                f"{prefix}.bias_dq",
                axis=0,
            )
            node.input[2] = f"{prefix}.bias_dq"
        else:  # the rounded values the forward pass added, in float
            node.input[2] = added.constant(f"{prefix}.bias", bias.astype(np.float32) * bias_scale)
    y = node.output[0]
    if q.output_scale is not None and q.output_zero_point is not None and y not in graph_outputs:
        node.output[0] = f"{prefix}.output"
        added.after += added.qdq(
            node.output[0], y, f"{prefix}.output", q.output_scale, q.output_zero_point, act_dtype
        )
    return added
