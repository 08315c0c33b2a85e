"""TensorRT: build an engine from an exported ONNX file, and run it as a :class:`Runner`.

TensorRT is optional and GPU-only, so it is imported inside the functions that need it: this
module imports (and ``import exporters`` works) without TensorRT or CUDA.

Precision depends on the TensorRT major version:

* TensorRT 10 (Jetson Orin / JetPack 6, DRIVE Orin): weakly typed networks; fp16 is a builder
  flag on an fp32 file, int8 needs a Q/DQ file plus the INT8 flag.
* TensorRT 11+: builder precision flags and INT8 calibrators are gone and every network is
  strongly typed; precision is whatever the ONNX file carries (fp16 casts, Q/DQ nodes), so an
  fp16 or int8 engine needs an fp16 or Q/DQ file.

Implicit (calibrator-based) INT8 is not supported on either version: the calibration stage
writes a Q/DQ ONNX file instead, which both versions build the same way.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from exporters.errors import ExportError, UserError
from exporters.onnx import load_onnx, read_onnx_metadata
from exporters.tensorrt_runner import (
    INSTALL_HINT,
    TensorRTRunner,
    import_tensorrt,
    read_engine_sidecar,
    sidecar_path,
    tensorrt_major,
)

__all__ = [
    "INSTALL_HINT",
    "PRECISIONS",
    "TensorRTRunner",
    "build_engine",
    "engine_precision_of_onnx",
    "import_tensorrt",
    "read_engine_sidecar",
    "tensorrt_major",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def engine_precision_of_onnx(onnx_path: str | os.PathLike[str]) -> str:
    """The precision an ONNX file carries: ``int8`` (Q/DQ nodes), ``fp16`` (fp16 casts or weights), else fp32.

    Raises:
        UserError: the file is missing or not an ONNX model.
    """
    graph = load_onnx(onnx_path, load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    if ops & _QDQ_OPS:
        return "int8"
    casts_to_fp16 = any(
        node.op_type == "Cast"
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)
        for node in graph.node
    )
    if casts_to_fp16 or any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    workspace_mb: int = 1024,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    extra_sidecar: dict[str, Any] | None = None,
) -> Path:
    """Build a serialised TensorRT engine from an ONNX file, written atomically.

    A ``<engine>.json`` sidecar records the precision, TensorRT version, batch range and the
    ONNX metadata, since an engine file has no room for them.

    Args:
        onnx_path: the exported model (for fp16/int8 on TensorRT 11: an fp16 or Q/DQ file).
        engine_path: where to write the engine.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        workspace_mb: builder workspace memory limit in MiB.
        min_batch: smallest batch of the optimisation profile (dynamic-batch files only).
        opt_batch: batch size TensorRT tunes kernels for; default 8, clamped to [min_batch, max_batch].
        max_batch: largest batch the engine accepts.
        extra_sidecar: more facts for the sidecar (the cache key of :mod:`exporters.engine`).

    Returns:
        The engine path.

    Raises:
        RuntimeUnavailableError: TensorRT is not installed or too old.
        UserError: bad precision or batch range, or the file's precision does not fit the request.
        ExportError: the parser or the builder failed (the parser's errors are in the message).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if opt_batch is None:
        opt_batch = max(min_batch, min(8, max_batch))
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    if workspace_mb < 1:
        raise UserError(f"workspace_mb must be >= 1, got {workspace_mb}")
    trt = import_tensorrt()
    major = tensorrt_major(trt)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _check_precision_source(precision, engine_precision_of_onnx(onnx_path), major)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in _precision_flags(trt, major, precision):
        config.set_flag(flag)
    batches = _add_batch_profile(builder, config, network, (min_batch, opt_batch, max_batch))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}; see its log above")
    _write_atomic(engine_path, bytes(memoryview(serialized)))
    sidecar = {
        "precision": precision,
        "tensorrt_version": str(trt.__version__),
        "min_batch": batches[0],
        "opt_batch": batches[1],
        "max_batch": batches[2],
        "onnx": onnx_path.name,
        "onnx_metadata": read_onnx_metadata(onnx_path),
        **(extra_sidecar or {}),
    }
    _write_atomic(sidecar_path(engine_path), json.dumps(sidecar, indent=2).encode())
    log.info(
        "built %s TensorRT %s engine %s (batch %d..%d)",
        precision,
        trt.__version__,
        engine_path,
        *batches[::2],
    )
    return engine_path


# ----------------------------------------------------------------------------- helpers


def _check_precision_source(requested: str, carried: str, major: int) -> None:
    """Refuse builds whose engine precision would not match the label it is reported under."""
    if requested == carried:
        return
    if major == 10 and requested == "fp16" and carried == "fp32":
        return  # the FP16 builder flag lowers an fp32 file
    if requested == "int8":
        fix = (
            "quantize it first (the quantize stage writes a Q/DQ file with the tensorrt scheme); "
            "calibrators are not supported"
        )
    elif requested == "fp16":
        fix = (
            f"TensorRT {major} takes precision from the file: convert it first "
            "(exporters.fp16.convert_to_fp16, which exporters.engine.ensure_engine does for you) "
            "or build with precision='fp32'"
        )
    else:
        fix = f"build with precision={carried!r} to match the file"
    raise UserError(f"a {requested} engine was asked for but the ONNX file carries {carried}; {fix}")


def _network_flags(trt: ModuleType, major: int) -> int:
    if major < 11:
        return 0  # weakly typed: builder flags choose the precision
    # Always strongly typed on 11+; the flag is accepted but ignored, and may one day go.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _precision_flags(trt: ModuleType, major: int, precision: str) -> list[Any]:
    if major >= 11 or precision == "fp32":
        return []  # 11+ has no precision flags: the file's casts and Q/DQ nodes decide
    return [trt.BuilderFlag.FP16] if precision == "fp16" else [trt.BuilderFlag.INT8]


def _add_batch_profile(
    builder: Any, config: Any, network: Any, batches: tuple[int, int, int]
) -> tuple[int, ...]:
    """Add the min/opt/max batch profile for a dynamic batch; returns the batch range used."""
    if network.num_inputs != 1:
        raise ExportError(f"expected one image input, the network has {network.num_inputs}")
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    if len(shape) != 4 or any(d < 0 for d in shape[1:]):
        raise ExportError(
            f"input {tensor.name!r} has shape {shape}; expected (N, C, H, W) with fixed C, H, W"
        )
    if shape[0] >= 0:
        log.info("fixed batch %d in the ONNX file; min/opt/max batch ignored", shape[0])
        return (shape[0],) * 3
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, *((b, *shape[1:]) for b in batches))
    config.add_optimization_profile(profile)
    return batches


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
