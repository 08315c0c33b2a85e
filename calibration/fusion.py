"""How many convolutions ONNX Runtime actually runs as integer kernels.

A Q/DQ file only pays on the CPU when ONNX Runtime fuses each ``DequantizeLinear -> Conv ->
QuantizeLinear`` pattern into an integer kernel (``QLinearConv``, or ``ConvInteger``); a
convolution left as float between Q/DQ pairs costs an FP32 convolution *plus* the
(de)quantisation, which is slower than the FP32 model. This module dumps the graph ONNX Runtime
optimised for this machine (``SessionOptions.optimized_model_filepath``) and counts.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from exporters.errors import UserError, resource_error

__all__ = ["INTEGER_CONV_OPS", "count_fused_kernels"]

# Integer convolution kernels of ONNX Runtime's CPU provider (NHWC variants included).
INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
INTEGER_MATMUL_OPS = (
    "QLinearMatMul",
    "MatMulInteger",
    "QGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
)
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "NhwcFusedConv")


def count_fused_kernels(path: str | os.PathLike[str], *, threads: int = 1) -> dict[str, Any]:
    """Optimise ``path`` as an ONNX Runtime CPU session would, and count the resulting kernels.

    Args:
        path: an ONNX file (Q/DQ or float).
        threads: intra-op threads of the session (the graph does not depend on it).

    Returns:
        ``{"conv_nodes": convolutions in the file, "integer_conv": convolutions ONNX Runtime
        runs as integer kernels, "float_conv": convolutions still in float,
        "integer_matmul": integer MatMul/Gemm kernels, "all_integer": every convolution fused,
        "optimized_ops": {op_type: count} of the optimised graph}``.

    Raises:
        UserError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    source = onnx.load(str(path), load_external_data=False)
    conv_nodes = sum(node.op_type == "Conv" for node in source.graph.node)
    with tempfile.TemporaryDirectory(prefix="robustprune-opt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # the dump's "hardware specific" warning is the point here
        try:
            ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind types
            raise resource_error(exc, f"loading {path} in ONNX Runtime") or UserError(
                f"ONNX Runtime cannot load {path}: {str(exc).strip().splitlines()[0]}"
            ) from exc
        ops = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    integer_conv = sum(ops[op] for op in INTEGER_CONV_OPS)
    float_conv = sum(ops[op] for op in FLOAT_CONV_OPS)
    return {
        "conv_nodes": conv_nodes,
        "integer_conv": integer_conv,
        "float_conv": float_conv,
        "integer_matmul": sum(ops[op] for op in INTEGER_MATMUL_OPS),
        "all_integer": conv_nodes > 0 and integer_conv == conv_nodes and float_conv == 0,
        "optimized_ops": dict(sorted(ops.items())),
    }
