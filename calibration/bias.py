"""Empirical bias correction of a Q/DQ file (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019, section 4.2; NNCF's post-training
``BiasCorrection`` does the same on calibration data).

Rounding the weights (and, upstream, the activations) moves the *mean* of a layer's output, not
only its spread: a channel whose int8 weights sum a little high is high on every image, and the
layers after it see a shifted input. For each quantised layer with a bias (Conv, ConvTranspose,
Gemm, and MatMul followed by the Add of a constant), this module measures the mean per output
channel of the FP32 graph's output of that layer and of the quantised graph's, both on the
calibration images, and subtracts the difference from the quantised file's bias.

The quantised layer is measured on the quantised graph's own inputs to it, so what earlier
layers got wrong (their rounding, and their corrections) is accounted for. A layer's output
depends only on the biases of the layers upstream of it, so layers are corrected in *levels*
(level of a layer: one more than the deepest corrected layer upstream of it), one run of the
quantised graph per level: every layer of a level sees exactly the corrected upstream that
one-at-a-time processing in topological order would give it, in fewer runs.

Deviations from the paper: the shift is measured on data (its "empirical" variant), not derived
from BatchNorm statistics; the measured output is the layer's before any activation (ONNX
Runtime folds a ReLU into the output's uint8 range, so there is no post-ReLU float tensor).

The bias keeps its encoding: ONNX Runtime stores a Conv or Gemm bias as int32 with scale
``input_scale * weight_scale`` (its integer kernels need exactly that scale), so the int32
values are rewritten on that grid; a float bias is rewritten as is; an 8-bit constant of an Add
keeps its zero point, widens its own scale only if the corrected values no longer fit, and so
takes the correction to within half of its (coarser) step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["BiasCorrection", "BiasedLayer", "biased_layers", "correct_bias", "layer_means"]

log = logging.getLogger(__name__)

_CHANNEL_FIRST = ("Conv", "ConvTranspose")  # output channels on axis 1; Gemm and Add: the last


@dataclass(frozen=True)
class BiasedLayer:
    """A layer whose bias can absorb its output's mean shift.

    Attributes:
        node: the node's name (the same in the FP32 and the quantised graph): the Conv, Gemm or
            ConvTranspose, or the Add after a MatMul.
        output: its output tensor in the FP32 graph.
        axis: the output's channel axis (1, or -1 for Gemm and MatMul + Add).
    """

    node: str
    output: str
    axis: int


@dataclass
class BiasCorrection:
    """What :func:`correct_bias` did.

    Attributes:
        model: the corrected quantised model (a copy; the input is not modified).
        shifts: per corrected layer, the mean shift of each output channel that was subtracted
            from its bias (quantised mean minus FP32 mean, in the output's units).
        passes: runs of the quantised graph over the calibration images (one per level).
        clipped: layers whose corrected bias did not fit its integer type (clipped to it).
    """

    model: onnx.ModelProto
    shifts: dict[str, np.ndarray] = field(default_factory=dict)
    passes: int = 0
    clipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Per layer, the mean |shift| over its channels (what the report records)."""
        return {name: float(np.abs(s).mean()) for name, s in self.shifts.items()}


def biased_layers(model: onnx.ModelProto) -> list[BiasedLayer]:
    """The named layers of an FP32 graph whose bias is a constant, in graph (topological) order."""
    constants = {i.name for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if not node.name:  # matched to the quantised graph by name
            continue
        if node.op_type in (*_CHANNEL_FIRST, "Gemm") and len(node.input) == 3 and node.input[2] in constants:
            found.append(BiasedLayer(node.name, node.output[0], 1 if node.op_type in _CHANNEL_FIRST else -1))
        elif node.op_type == "Add" and _matmul_bias(node, producers, constants) is not None:
            found.append(BiasedLayer(node.name, node.output[0], -1))
    return found


def layer_means(
    model: onnx.ModelProto,
    outputs: Mapping[str, int],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    optimize: bool = True,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """The mean of each tensor of ``outputs`` (name -> channel axis) per channel, over every
    other axis and every feed, with a copy of ``model`` cut down to what computes them.

    Args:
        optimize: let ONNX Runtime fuse the graph (a quantised file then runs its integer
            kernels, as deployed); False keeps every node as written.
    """
    import onnxruntime as ort

    augmented = _up_to(model, list(outputs))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        augmented.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = list(outputs)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed))):
            axis = outputs[name]
            channels = np.moveaxis(value.astype(np.float64), axis, -1).reshape(-1, value.shape[axis])
            sums[name] = sums.get(name, 0) + channels.sum(axis=0)
            counts[name] += len(channels)
    return {name: sums[name] / counts[name] for name in names}


def correct_bias(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    fp32_means: Mapping[str, np.ndarray] | None = None,
    fused: bool = True,
    threads: int = 1,
) -> BiasCorrection:
    """Subtract each quantised layer's mean output shift from its bias.

    Args:
        fp32: the graph ``quantized`` was made from (the same node names).
        quantized: a Q/DQ model in ONNX Runtime's QDQ layout.
        feeds: the calibration inputs, one ``{input name: array}`` per run.
        fp32_means: the FP32 layers' per-channel means on ``feeds`` (:func:`layer_means` of
            :func:`biased_layers`), when already measured; measured here otherwise.
        fused: measure the quantised layers as ONNX Runtime's CPU runs the file (the layers
            upstream of the one measured in its integer kernels, whose rounding differs a little
            from the Q/DQ nodes'), for a file made for it; False: as the Q/DQ nodes define it,
            for a file another runtime (TensorRT) will compile.
        threads: ONNX Runtime intra-op threads.

    Returns:
        A :class:`BiasCorrection` with the corrected copy. Layers kept in float (excluded from
        quantisation) are left as they are.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    layers = [layer for layer in biased_layers(fp32) if _quantised_bias(model, layer.node) is not None]
    result = BiasCorrection(model)
    if not layers:
        return result
    if fp32_means is None or any(layer.output not in fp32_means for layer in layers):
        fp32_means = layer_means(
            fp32, {layer.output: layer.axis for layer in layers}, feeds, optimize=False, threads=threads
        )
    for level in _levels(model, [layer.node for layer in layers]):
        batch = [layer for layer in layers if layer.node in level]
        outputs = {_node(model, layer.node).output[0]: layer.axis for layer in batch}
        measured = layer_means(model, outputs, feeds, optimize=fused, threads=threads)
        result.passes += 1
        for layer in batch:
            shift = measured[_node(model, layer.node).output[0]] - fp32_means[layer.output]
            try:
                clipped = _shift_bias(model, layer.node, shift)
            except ValueError as exc:
                log.info("bias correction skips %s", exc)
                continue
            if clipped:
                result.clipped.append(layer.node)
            result.shifts[layer.node] = shift.astype(np.float32)
    if result.clipped:
        log.warning("bias correction: the corrected biases of %s were clipped to their range", result.clipped)
    return result


def _up_to(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``outputs``, without the nodes they do not need (a
    layer early in the graph is then measured at the cost of the layers before it only)."""
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep: set[int] = set()
    pending = [producers[t] for t in outputs if t in producers]
    while pending:
        index = pending.pop()
        if index not in keep:
            keep.add(index)
            pending.extend(producers[t] for t in graph.node[index].input if t in producers)
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        keep = set(range(len(graph.node)))  # a subgraph may read any outer tensor: keep them all
    nodes = [node for i, node in enumerate(graph.node) if i in keep]
    used = {t for node in nodes for t in node.input}
    cut = onnx.helper.make_graph(
        nodes,
        graph.name,
        list(graph.input),
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        [init for init in graph.initializer if init.name in used],
    )
    out = onnx.helper.make_model(cut, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out


def _matmul_bias(
    node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto], constants: set[str]
) -> str | None:
    """The constant 1-D input of an Add whose other input is a MatMul's output (a linear layer)."""
    if len(node.input) != 2:
        return None
    for data, bias in (node.input, reversed(node.input)):
        source = producers.get(data)
        if source is not None and source.op_type == "MatMul" and bias in constants:
            return bias
    return None


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _dequantized(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The DequantizeLinear of a constant that produces ``tensor``, if one does."""
    constants = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == tensor and node.input[0] in constants:
            return node
    return None


def _weight_is_quantised(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """The layer's weight comes out of a DequantizeLinear: it is an INT8 layer of the file."""
    if node.op_type == "Add":  # the weight is the MatMul's
        producers = {out: n for n in model.graph.node for out in n.output}
        for data in node.input:
            source = producers.get(data)
            while source is not None and source.op_type in ("QuantizeLinear", "DequantizeLinear"):
                source = producers.get(source.input[0])
            if source is not None and source.op_type == "MatMul":
                return any(_dequantized(model, t) is not None for t in source.input)
        return False
    return len(node.input) > 1 and _dequantized(model, node.input[1]) is not None


def _quantised_bias(model: onnx.ModelProto, name: str) -> str | None:
    """The bias input of the quantised graph's node ``name``, if that node is an INT8 layer whose
    bias is a constant (stored as is, or behind a DequantizeLinear)."""
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None or not _weight_is_quantised(model, node):
        return None
    constants = {i.name for i in model.graph.initializer}
    candidates = [node.input[2]] if node.op_type != "Add" else list(node.input)
    for tensor in candidates:
        if tensor in constants or _dequantized(model, tensor) is not None:
            return tensor
    return None


def _levels(model: onnx.ModelProto, layers: Sequence[str]) -> list[set[str]]:
    """``layers`` grouped by level: 0 for those with no other layer of ``layers`` upstream, else
    one more than the deepest such layer (the nodes are in topological order, as ONNX requires)."""
    wanted = set(layers)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    # Per node: the deepest level of a listed layer upstream of it (-1: none), and its own.
    upstream: dict[str, int] = {}
    level: dict[str, int] = {}
    for node in model.graph.node:
        deepest = max((upstream.get(producers.get(t, ""), -1) for t in node.input), default=-1)
        if node.name in wanted:
            level[node.name] = deepest + 1
            upstream[node.name] = deepest + 1
        else:
            upstream[node.name] = deepest
    groups: list[set[str]] = [set() for _ in range(max(level.values()) + 1)]
    for name, depth in level.items():
        groups[depth].add(name)
    return groups


def _shift_bias(model: onnx.ModelProto, name: str, shift: np.ndarray) -> bool:
    """Subtract ``shift`` from the node's bias in its own encoding; True when it had to be clipped."""
    node = _node(model, name)
    tensor = _quantised_bias(model, name)
    assert tensor is not None  # only layers with one are corrected
    delta = -shift / _gemm_beta(node)
    inits = {i.name: i for i in model.graph.initializer}
    dq = _dequantized(model, tensor)
    if dq is None:  # a float bias
        old = numpy_helper.to_array(inits[tensor])
        if old.size != delta.size:
            raise ValueError(f"{name}: bias of {old.size} values for {delta.size} channels")
        _replace(inits[tensor], (old + delta.reshape(old.shape)).astype(old.dtype))
        return False
    q = numpy_helper.to_array(inits[dq.input[0]])
    if q.size != delta.size:  # a bias broadcast over the channels cannot take one shift per channel
        raise ValueError(f"{name}: bias of {q.size} values for {delta.size} channels")
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
    target = (q.astype(np.float64) - zero) * scale + delta.reshape(q.shape)
    info = np.iinfo(q.dtype)
    shared = sum(dq.input[1] in n.input for n in model.graph.node) > 1
    if q.dtype != np.int32 and not shared:  # an 8-bit constant of its own: widen its scale, not clip
        room = np.maximum(target / np.where(target >= 0, info.max - zero, info.min - zero), 0)
        scale = np.maximum(scale, room.max() if scale.ndim == 0 else room)
        _replace(inits[dq.input[1]], scale.astype(np.float32))
    values = np.round(target / scale + zero)
    clipped = bool(np.any(values < info.min) or np.any(values > info.max))
    _replace(inits[dq.input[0]], np.clip(values, info.min, info.max).astype(q.dtype))
    return clipped


def _gemm_beta(node: onnx.NodeProto) -> float:
    """How much of the stored bias a Gemm adds (``beta``; 1 for every other op)."""
    if node.op_type != "Gemm":
        return 1.0
    return next((float(a.f) for a in node.attribute if a.name == "beta"), 1.0)


def _replace(init: onnx.TensorProto, values: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(values, init.name))
