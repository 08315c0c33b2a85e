"""Is the INT8 file faster than its FP32 file on ONNX Runtime's CPU, and if not, why?

INT8 pays on the CPU only where ONNX Runtime fuses Q/DQ convolutions into integer kernels and
the convolutions are large enough for the integer arithmetic to outweigh the quantise and
dequantise steps around them. A small model (a few MMACs, narrow layers) spends most of its
time in per-operator overhead, which INT8 adds to: there the INT8 file is slower, and the
reason is written next to the measurement (integer kernels, Q/DQ nodes ONNX Runtime could not
fold away, work per convolution) instead of a speed-up being assumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from exporters.latency import compare_latency
from exporters.ort_runner import OnnxRuntimeRunner

__all__ = ["int8_speed", "why_not_faster"]

_QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def int8_speed(
    fp32: str | os.PathLike[str],
    int8: str | os.PathLike[str],
    fusion: dict[str, Any],
    *,
    batches: Sequence[int],
    threads: int,
    iterations: int = 50,
    warmup: int = 10,
    all_int8: str | os.PathLike[str] | None = None,
    macs: int | None = None,
) -> dict[str, Any]:
    """Time the FP32 and INT8 files (interleaved, as the bench stage does) at each batch size.

    Args:
        fp32, int8: the files.
        fusion: :func:`calibration.fusion.count_fused_kernels` of the INT8 file.
        batches: batch sizes (a fixed-batch file is timed at its own batch only).
        threads: ONNX Runtime intra-op threads.
        iterations, warmup: timed and untimed calls per file and batch.
        all_int8: the file with every layer in INT8, when mixed precision kept some in FP32:
            timed too, so the report shows what the FP32 layers cost.
        macs: multiply-accumulates of one image (for the reason line).

    Returns:
        ``{"runtime", "threads", "batches": {batch: {"fp32_p50_ms", "int8_p50_ms", "speedup"
        [, "all_int8_p50_ms", "mixed_precision_cost"]}}, "faster", "why_not"}``: ``speedup`` is
        FP32 p50 / INT8 p50, ``mixed_precision_cost`` the INT8 file's p50 / the all-INT8 file's,
        ``faster`` whether INT8 won at every batch, ``why_not`` a line when it did not.
    """
    runners = {"fp32": OnnxRuntimeRunner(fp32, threads=threads, spinning=True)}
    runners["int8"] = OnnxRuntimeRunner(int8, threads=threads, spinning=True)
    if all_int8 is not None:
        runners["all_int8"] = OnnxRuntimeRunner(all_int8, threads=threads, spinning=True)
    fixed = runners["fp32"].input_spec.batch
    rows: dict[str, dict[str, float]] = {}
    for batch in [fixed] if fixed is not None else list(batches):
        stats = compare_latency(runners, batch=batch, warmup=warmup, iterations=iterations)
        row = {
            "fp32_p50_ms": stats["fp32"]["p50_ms"],
            "int8_p50_ms": stats["int8"]["p50_ms"],
            "speedup": stats["fp32"]["p50_ms"] / stats["int8"]["p50_ms"],
        }
        if "all_int8" in stats:
            row["all_int8_p50_ms"] = stats["all_int8"]["p50_ms"]
            row["mixed_precision_cost"] = stats["int8"]["p50_ms"] / stats["all_int8"]["p50_ms"]
        rows[str(batch)] = row
    faster = all(r["speedup"] > 1.0 for r in rows.values())
    return {
        "runtime": "onnxruntime",
        "threads": threads,
        "batches": rows,
        "faster": faster,
        "why_not": None if faster else why_not_faster(fusion, macs),
    }


def why_not_faster(fusion: dict[str, Any], macs: int | None = None) -> str:
    """One line on why an INT8 file is not faster: unfused convolutions, the Q/DQ nodes left in
    ONNX Runtime's optimised graph, and the work per convolution."""
    ops = fusion.get("optimized_ops", {})
    convs, fused = fusion.get("conv_nodes", 0), fusion.get("integer_conv", 0)
    qdq = sum(ops.get(op, 0) for op in _QDQ)
    parts = [f"ONNX Runtime runs {fused} of {convs} convolutions as integer kernels"]
    if fused < convs:
        parts.append(f"{convs - fused} stay in float between Q/DQ pairs, slower than in the FP32 file")
    parts.append(f"{qdq} quantise/dequantise nodes remain in its optimised graph (each a pass over a tensor)")
    if macs is not None and convs:
        parts.append(f"{macs / convs / 1e6:.2f} MMACs per convolution per image")
    return "; ".join(parts)
