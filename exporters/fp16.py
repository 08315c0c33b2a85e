"""Convert an FP32 ONNX file to FP16 compute, keeping float32 input and output.

TensorRT 11 builds strongly typed networks only: an FP16 engine needs an ONNX file whose
tensors are float16. This conversion casts every float initializer, constant and intermediate
tensor to float16, puts one Cast after the pixel input and one before the logits output (so
callers keep feeding float32 pixels and reading float32 logits), and retargets ``Cast`` nodes
that produced float32 to float16. The graphs this project exports (Conv, BatchNormalization,
Relu, Add, pooling, Gemm, normalisation arithmetic) need nothing more; ops with inputs that
must stay float32 by the ONNX spec are refused by name rather than converted wrongly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.errors import ExportError
from exporters.onnx import load_onnx

__all__ = ["convert_to_fp16"]

# Ops with an input or attribute that the ONNX spec keeps in float32 whatever the data type.
_UNSUPPORTED = {"Resize", "Upsample", "RandomNormal", "RandomUniform", "EyeLike", "Range"}
_FP16_MAX = float(np.finfo(np.float16).max)


def convert_to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write an FP16-compute copy of the FP32 ONNX file ``src`` to ``dst``.

    Weights beyond the float16 range are clipped to it (and counted in the ``fp16_clipped``
    metadata key, 0 for ordinary networks). Metadata is kept, with ``precision: fp16``.

    Returns:
        ``dst``.

    Raises:
        UserError: ``src`` is missing or not ONNX.
        ExportError: the graph already has float16 tensors, or uses an op listed in
            ``_UNSUPPORTED``, or the converted graph fails the ONNX checker.
    """
    model = load_onnx(src)
    graph = model.graph
    bad = sorted({n.op_type for n in graph.node} & _UNSUPPORTED)
    if bad:
        raise ExportError(
            f"{Path(src).name}: ops {bad} keep float32 inputs; convert it with ModelOpt autocast"
        )
    if any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer):
        raise ExportError(f"{Path(src).name} already has float16 weights")
    clipped = 0
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init)
            clipped += int((np.abs(array) > _FP16_MAX).sum())
            half = np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(half, init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name)
                )
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    _cast_boundaries(graph)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({"precision": "fp16", "fp16_clipped": str(clipped)})
    onnx.helper.set_model_props(model, props)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the float16 graph fails the ONNX checker: {exc}") from exc
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _cast_boundaries(graph: onnx.GraphProto) -> None:
    """Float32 graph inputs and outputs stay float32, with a Cast on the graph side of each."""
    initializers = {init.name for init in graph.initializer}
    casts = []
    for value in graph.input:
        if value.name in initializers or value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{value.name}_fp16"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        casts.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16, name=inner))
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{value.name}_fp16"
        for node in graph.node:
            node.output[:] = [inner if name == value.name else name for name in node.output]
            node.input[:] = [inner if name == value.name else name for name in node.input]
        graph.node.append(
            helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT, name=f"{inner}_out")
        )
    for cast in reversed(casts):
        graph.node.insert(0, cast)
