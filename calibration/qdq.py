"""Static INT8 quantisation of an exported ONNX file into a Q/DQ ONNX file (ONNX Runtime tools).

The file that comes out is an ordinary ONNX model with QuantizeLinear/DequantizeLinear pairs
around every quantised tensor: ONNX Runtime fuses them into integer kernels where it can, and
TensorRT builds an explicit-precision INT8 engine from it. Its metadata keeps the source file's
(input range, classes, mean/std) and adds ``precision: int8``, the scheme and how it was
calibrated, so a runner or a report needs nothing else to interpret it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.schemes import SCHEMES, QuantScheme
from exporters.errors import ExportError, UserError
from exporters.onnx import INPUT_NAME, load_onnx

__all__ = ["METHODS", "QuantizeResult", "quantize_onnx"]

log = logging.getLogger(__name__)

# Calibration methods by recipe name -> onnxruntime.quantization.CalibrationMethod member.
METHODS = {
    "minmax": "MinMax",
    "entropy": "Entropy",
    "percentile": "Percentile",
    "distribution": "Distribution",
}
_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote.

    Attributes:
        path: the Q/DQ ONNX file.
        scheme: the scheme's name.
        method: the calibration method.
        per_channel: per-channel weight scales.
        samples: calibration images used.
        quantized_nodes: count per op type of the nodes that got Q/DQ inputs (Conv, Gemm, ...).
        excluded_nodes: the node names kept in float, as asked.
    """

    path: Path
    scheme: str
    method: str
    per_channel: bool
    samples: int
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a fixed array of images."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int) -> None:
        self._input_name = input_name
        self._batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {self._input_name: self._batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    images: np.ndarray,
    *,
    scheme: str = "u8s8",
    method: str = "minmax",
    per_channel: bool = True,
    percentile: float = 99.999,
    exclude_nodes: Sequence[str] = (),
    preprocess: bool = True,
    batch_size: int = 32,
    metadata: dict[str, Any] | None = None,
) -> QuantizeResult:
    """Write a static INT8 Q/DQ copy of ``src`` to ``dst``, calibrated on ``images``.

    Args:
        src: an FP32 ONNX file (one NCHW pixel input, as :func:`exporters.onnx.export_onnx`
            writes).
        dst: where to write the Q/DQ file (atomically; parent folders are created).
        images: float32 ``(N, C, H, W)`` calibration pixels in [0, 1].
        scheme: a name in :data:`calibration.schemes.SCHEMES`.
        method: ``minmax``, ``entropy``, ``percentile`` or ``distribution``.
        per_channel: one weight scale per output channel (recommended for convolutions).
        percentile: the percentile kept by ``method="percentile"``.
        exclude_nodes: node names (of the pre-processed graph) to keep in float.
        preprocess: run ONNX Runtime's quantisation pre-processing first (shape inference and
            graph optimisation, which folds BatchNorm into the convolutions so they quantise
            as one op).
        batch_size: calibration batch size (a fixed-batch file is fed one image at a time).
        metadata: extra ``metadata_props`` (non-strings stored as JSON).

    Returns:
        A :class:`QuantizeResult`.

    Raises:
        UserError: unknown scheme or method, bad images, or the file is missing or unreadable.
        ExportError: ONNX Runtime's quantiser failed.
    """
    from onnxruntime import quantization as ortq  # heavy; only when quantising

    chosen: QuantScheme = SCHEMES.get(scheme)
    if method not in METHODS:
        raise UserError(f"calibration method must be one of {sorted(METHODS)}, got {method!r}")
    src, dst = Path(src), Path(dst)
    source = load_onnx(src)
    input_name, fixed_batch = _image_input(source, src)
    images = _check_images(images, source, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="robustprune-qdq-") as tmp:
        model_in = Path(tmp) / "pre.onnx"
        if preprocess:
            ortq.quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
        else:
            onnx.save(source, str(model_in))
        names = {node.name for node in onnx.load(str(model_in)).graph.node}
        unknown = sorted(set(exclude_nodes) - names)
        if unknown:
            raise UserError(
                f"exclude_nodes {unknown} are not nodes of the (pre-processed) graph; "
                f"node names: {', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''}"
            )
        out_tmp = Path(tmp) / "qdq.onnx"
        reader = _Reader(input_name, images, 1 if fixed_batch else batch_size)
        try:
            ortq.quantize_static(
                str(model_in),
                str(out_tmp),
                reader,
                quant_format=ortq.QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=getattr(ortq.QuantType, _QUANT_TYPES[chosen.activation_type]),
                weight_type=getattr(ortq.QuantType, _QUANT_TYPES[chosen.weight_type]),
                nodes_to_exclude=list(exclude_nodes),
                calibrate_method=getattr(ortq.CalibrationMethod, METHODS[method]),
                extra_options={
                    "ActivationSymmetric": chosen.activation_symmetric,
                    "WeightSymmetric": chosen.weight_symmetric,
                    "CalibPercentile": percentile,
                },
            )
        except Exception as exc:  # the quantiser raises many unrelated types
            raise ExportError(f"INT8 quantization of {src.name} failed: {_first_line(exc)}") from exc
        quantized = onnx.load(str(out_tmp))
    counts = quantized_node_counts(quantized)
    props = {p.key: p.value for p in source.metadata_props}
    props.update(
        {
            "precision": "int8",
            "quant_scheme": chosen.name,
            "quant_method": method,
            "quant_per_channel": json.dumps(per_channel),
            "quant_samples": str(len(images)),
            "quant_source": src.name,
        }
    )
    props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    onnx.helper.set_model_props(quantized, props)
    _save_atomic(quantized, dst)
    log.info("quantized %s -> %s (%s, %s, %d images): %s", src.name, dst, scheme, method, len(images), counts)
    return QuantizeResult(
        path=dst,
        scheme=chosen.name,
        method=method,
        per_channel=per_channel,
        samples=len(images),
        quantized_nodes=counts,
        excluded_nodes=list(exclude_nodes),
    )


def quantized_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count, per op type, the compute nodes whose data input comes from a DequantizeLinear."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.input and node.input[0] in dequantized:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _image_input(model: onnx.ModelProto, path: Path) -> tuple[str, bool]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, found {len(inputs)}")
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    fixed = batch_dim.HasField("dim_value") and batch_dim.dim_value > 0
    return inputs[0].name or INPUT_NAME, fixed


def _check_images(images: Any, model: onnx.ModelProto, path: Path) -> np.ndarray:
    array = np.asarray(images)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if array.ndim != 4 or len(array) == 0 or list(array.shape[1:]) != dims[1:]:
        raise UserError(
            f"calibration images must be a non-empty (N, {', '.join(map(str, dims[1:]))}) array for "
            f"{path.name}, got shape {tuple(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"calibration images must be float pixels in [0, 1], got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
