"""ONNX Runtime's GPU execution providers (CUDA, TensorRT) as runners.

They are :class:`~exporters.ort_runner.OnnxRuntimeRunner` sessions with another provider list;
the runner records the provider that actually runs the graph (``runner.provider``), since ONNX
Runtime falls back to the CPU when a GPU provider fails to start, and reports itself as
``onnxruntime-cuda`` / ``onnxruntime-tensorrt`` so results never mix with the CPU runtime's.
Neither has run here (no GPU on this project's machines): the provider options follow ONNX
Runtime's documentation, and the logic is tested with a stubbed provider list.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from exporters.errors import RuntimeUnavailableError, UserError
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.runtime_spec import RuntimeSpec, register

__all__ = ["ort_cuda_runner", "ort_provider_missing", "ort_tensorrt_runner"]

_CPU, _CUDA, _TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_HINT = "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with an NVIDIA GPU"


def ort_provider_missing(provider: str) -> str | None:
    """Why ONNX Runtime's ``provider`` cannot run here, or None if this build has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        return f"this onnxruntime build has no {provider} (it has {', '.join(available)}); {_HINT}"
    return None


def _device_id(device: str) -> str:
    parsed = torch.device(device)
    if parsed.type != "cuda":
        raise UserError(f"ONNX Runtime's GPU providers run on CUDA devices, got device {device!r}")
    return str(parsed.index or 0)


def _require(provider: str) -> None:
    reason = ort_provider_missing(provider)
    if reason:
        raise RuntimeUnavailableError(reason)


def ort_cuda_runner(
    path: str | os.PathLike[str],
    *,
    threads: int = 2,
    precision: str | None = None,
    device: str = "cuda",
    spinning: bool = False,
) -> OnnxRuntimeRunner:
    """An ONNX Runtime session on the CUDA execution provider (CPU for unsupported nodes).

    Raises:
        RuntimeUnavailableError: this onnxruntime build has no CUDA provider.
        UserError: ``device`` is not a CUDA device, or as :class:`OnnxRuntimeRunner`.
    """
    device_id = _device_id(device)
    _require(_CUDA)
    return OnnxRuntimeRunner(
        path,
        threads=threads,
        providers=[_CUDA, _CPU],
        provider_options=[{"device_id": device_id}, {}],
        precision=precision,
        spinning=spinning,
        runtime="onnxruntime-cuda",
    )


def ort_tensorrt_runner(
    path: str | os.PathLike[str],
    *,
    threads: int = 2,
    precision: str | None = None,
    device: str = "cuda",
    workspace_mb: int = 1024,
    cache_dir: str | os.PathLike[str] | None = None,
    spinning: bool = False,
) -> OnnxRuntimeRunner:
    """An ONNX Runtime session on the TensorRT execution provider (then CUDA, then CPU).

    The provider builds its own engine on first use and caches it in ``cache_dir`` (default a
    ``trt-cache`` folder beside the file). FP16 on an FP32 file is the provider's FP16 flag;
    INT8 needs a Q/DQ file (explicit quantisation), never a calibration table.

    Raises:
        RuntimeUnavailableError: this onnxruntime build has no TensorRT provider.
        UserError: ``precision`` is int8 for a file without Q/DQ nodes, or as above.
    """
    device_id = _device_id(device)
    _require(_TRT)
    path = Path(path)
    from exporters.tensorrt import engine_precision_of_onnx

    carried = engine_precision_of_onnx(path)
    wanted = precision or carried
    if wanted == "int8" and carried != "int8":
        raise UserError(f"an int8 TensorRT provider session needs a Q/DQ file; {path.name} carries {carried}")
    cache = Path(cache_dir) if cache_dir else path.parent / "trt-cache"
    trt_options = {
        "device_id": device_id,
        "trt_max_workspace_size": str(workspace_mb << 20),
        "trt_fp16_enable": "True" if wanted == "fp16" else "False",
        "trt_int8_enable": "True" if wanted == "int8" else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
    }
    return OnnxRuntimeRunner(
        path,
        threads=threads,
        providers=[_TRT, _CUDA, _CPU],
        provider_options=[trt_options, {"device_id": device_id}, {}],
        precision=wanted,
        spinning=spinning,
        runtime="onnxruntime-tensorrt",
    )


register(
    RuntimeSpec(
        "onnxruntime-cuda",
        ort_cuda_runner,
        "onnx",
        missing=lambda: ort_provider_missing(_CUDA),
        description="ONNX Runtime's CUDA execution provider",
    )
)
register(
    RuntimeSpec(
        "onnxruntime-tensorrt",
        ort_tensorrt_runner,
        "onnx",
        missing=lambda: ort_provider_missing(_TRT),
        description="ONNX Runtime's TensorRT execution provider",
    )
)
