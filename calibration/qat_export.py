"""The Q/DQ ONNX file of a quantisation-aware fine-tuned model, with its trained scales.

:func:`export_qat` exports the float layers of a :func:`calibration.qat.prepare_qat` model
(:func:`exporters.onnx.export_onnx`; the rounded module outputs, residual additions, are
written by the exporter as QuantizeLinear/DequantizeLinear), then finds each trained layer's
node (the Conv, Gemm or MatMul whose weight initialiser holds exactly its float weights) and
puts around it what the layer rounded in training, in ONNX Runtime's QDQ layout:
``x -> Q -> DQ -> Conv(DQ(int8 weight), bias) -> Q -> DQ``, the bias an int32 tensor behind
DequantizeLinear for ONNX Runtime (``u8s8``: its ``QLinearConv`` fusion needs it) or its
rounded float values for TensorRT (``s8s8``: symmetric int8, zero points 0). Every number comes
from :meth:`calibration.qat.FakeQuantLayer.quantization`, computed with the torch ops of the
forward pass, so the file computes what the fake-quantised model computed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from calibration.qat import LayerQuant, float_copy, float_layers, qat_layers
from calibration.qdq import quantized_node_counts
from exporters.base import InputSpec
from exporters.errors import ExportError, UserError
from exporters.onnx import export_onnx, load_onnx

__all__ = ["QatExport", "export_qat"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QatExport:
    """What :func:`export_qat` wrote.

    Attributes:
        path: the Q/DQ ONNX file.
        scheme: the scheme's name (the layers').
        quantized_nodes: count per op type of the nodes that got Q/DQ inputs.
        layers: per fake-quantised layer, the ONNX nodes it became.
        unmatched_nodes: convolutions and matrix products left in float that no layer of the
            model accounts for (neither a trained layer nor one ``prepare_qat`` kept in float).
        float_nodes: the nodes of the layers ``prepare_qat`` kept in float (mixed precision).
    """

    path: Path
    scheme: str
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    layers: dict[str, list[str]] = field(default_factory=dict)
    unmatched_nodes: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)


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
        ExportError: a trained layer has no node in the exported graph, or its bias does not
            fit the int32 grid (an activation scale that training drove to nothing).
    """
    layers = qat_layers(model)
    if not layers:
        raise UserError("export_qat needs a model from prepare_qat (it has no FakeQuantLayer)")
    if opset < 13:
        raise UserError(f"QAT export needs opset 13 or later (per-channel DequantizeLinear), got {opset}")
    scheme = next(iter(layers.values())).scheme
    float_model = float_copy(model)
    quant = {}
    for name, layer in layers.items():
        try:
            quant[name] = layer.quantization()
        except ExportError as exc:
            raise ExportError(f"QAT layer {name}: {exc}") from exc
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
    matched, unmatched, floats = _insert_qdq(proto, quant, _float_layer_weights(model))
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
    return QatExport(path, scheme, quantized_node_counts(proto), matched, unmatched, floats)


def _float_layer_weights(model: nn.Module) -> set[tuple[tuple[int, ...], bytes]]:
    """The weights (shape and bytes, also transposed) of the layers ``prepare_qat`` kept in float."""
    keys = set()
    for module in float_layers(model).values():
        keys.update(_weight_keys(cast(torch.Tensor, module.weight).detach().cpu().numpy()))
    return keys


def _weight_keys(weight: np.ndarray) -> list[tuple[tuple[int, ...], bytes]]:
    """How a layer's weights can stand in the exported graph: as they are, and for a linear
    layer exported as MatMul (or Gemm without transB) transposed to [in, out]."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    keys = [(w.shape, w.tobytes())]
    if w.ndim == 2:
        wt = np.ascontiguousarray(w.T)
        keys.append((wt.shape, wt.tobytes()))
    return keys


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
    proto: onnx.ModelProto,
    quant: dict[str, LayerQuant],
    float_weights: set[tuple[tuple[int, ...], bytes]],
) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Put each layer's Q/DQ nodes into the exported float graph (in place). A layer's node is
    the Conv, Gemm or MatMul whose weight initialiser holds exactly its float weights.

    Returns:
        ``(matched, unmatched, floats)``: each layer's nodes, the nodes left float that no layer
        accounts for, and those whose weights are in ``float_weights`` (kept float on purpose).
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    by_weight: dict[tuple[tuple[int, ...], bytes], list[tuple[str, int]]] = {}
    for name, q in quant.items():
        for transposed, layout in enumerate(_weight_keys(q.weight)):
            by_weight.setdefault(layout, []).append((name, transposed))
    graph_outputs = {o.name for o in graph.output}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    matched: dict[str, list[str]] = {name: [] for name in quant}
    unmatched: list[str] = []
    floats: list[str] = []
    nodes: list[onnx.NodeProto] = []
    added_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type in _QUANTISED_OPS and len(node.input) > 1 else None
        if weight is None:
            nodes.append(node)
            continue
        key = _weight_keys(numpy_helper.to_array(weight))[0]
        candidates = by_weight.get(key, [])
        axis = candidates[0][1] if candidates else None
        if len({c[0] for c in candidates}) != 1 or (
            node.op_type == "Gemm" and axis != (0 if _attr(node, "transB", 0) else 1)
        ):
            (floats if key in float_weights else unmatched).append(node.name)
            nodes.append(node)
            continue
        name = candidates[0][0]
        added = _quantize_node(
            node, quant[name], int(axis or 0), f"{name}.{len(matched[name])}", graph_outputs, dequantized
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
    return matched, unmatched, floats


_QUANTISED_OPS = ("Conv", "Gemm", "MatMul")


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default


def _quantize_node(
    node: onnx.NodeProto,
    q: LayerQuant,
    axis: int,
    prefix: str,
    graph_outputs: set[str],
    dequantized: set[str],
) -> _Added:
    """The Q/DQ nodes around one Conv/Gemm/MatMul node, which is rewired to read (and write)
    through them. An input already rounded to the layer's grid before it (a rounded module
    output, written by the exporter as Q/DQ) gets no second pair."""
    added = _Added()
    act_dtype = np.uint8 if q.activation_type == "uint8" else np.int8
    if not (q.input_rounded_before and node.input[0] in dequantized):
        rounded = f"{prefix}.input_dq"
        added.before += added.qdq(
            node.input[0], rounded, f"{prefix}.input", q.input_scale, q.input_zero_point, act_dtype
        )
        node.input[0] = rounded
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
        dequantized.add(y)  # a layer after it sharing this grid reads it as it is
    return added
