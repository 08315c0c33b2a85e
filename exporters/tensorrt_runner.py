"""Runner for a serialised TensorRT engine, with torch CUDA tensors as its I/O buffers.

``tensorrt`` is imported when a runner is created, never at module import, so this module
loads on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from exporters.base import InputSpec, Runner
from exporters.errors import ExportError, InputSpecError, RuntimeUnavailableError, UserError
from exporters.outputs import Outputs, concat

__all__ = [
    "INSTALL_HINT",
    "TensorRTRunner",
    "import_tensorrt",
    "read_engine_sidecar",
    "sidecar_path",
    "tensorrt_major",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed; pip install robustprune[tensorrt] on a machine with an NVIDIA GPU"
# TensorRT DataType member names -> torch dtypes; looked up by name since members vary by version.
_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def import_tensorrt() -> ModuleType:
    """Import and return the ``tensorrt`` module.

    Raises:
        RuntimeUnavailableError: TensorRT is not installed (the message says how to get it).
    """
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise RuntimeUnavailableError(INSTALL_HINT) from exc


def tensorrt_major(trt: ModuleType) -> int:
    """The major version of an imported TensorRT module (10, 11, ...).

    Raises:
        RuntimeUnavailableError: the version is unreadable or older than 10.
    """
    version = str(getattr(trt, "__version__", ""))
    head = version.split(".")[0]
    if not head.isdigit():
        raise RuntimeUnavailableError(f"cannot read the TensorRT version ({version!r}); reinstall TensorRT")
    if int(head) < 10:
        raise RuntimeUnavailableError(
            f"TensorRT {version} is too old; robustprune needs TensorRT 10 or newer"
        )
    return int(head)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """Where :func:`exporters.tensorrt.build_engine` records an engine's facts: ``<engine>.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar JSON of an engine (precision, TensorRT version, batch range); {} if absent."""
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


class TensorRTRunner(Runner):
    """Runs a TensorRT engine on one CUDA device with ``execute_async_v3``.

    Batches larger than the engine's maximum batch are run in chunks; a batch smaller than its
    minimum is an :class:`InputSpecError`.

    Attributes:
        engine_path: the engine file.
        batch_range: ``(min, max)`` batch sizes the engine's optimisation profile accepts.
        metadata: the engine's sidecar (see :func:`read_engine_sidecar`).
    """

    runtime = "tensorrt"

    def __init__(
        self, engine_path: str | os.PathLike[str], device: str = "cuda", precision: str | None = None
    ) -> None:
        """Deserialise the engine at ``engine_path`` and create an execution context.

        Args:
            engine_path: an engine built by :func:`exporters.tensorrt.build_engine`.
            device: the CUDA device (``"cuda"``, ``"cuda:1"``).
            precision: the reported precision; default the sidecar's, else ``"fp32"``.

        Raises:
            RuntimeUnavailableError: TensorRT or CUDA is missing.
            UserError: the engine file is missing.
            ExportError: the engine cannot be deserialised or does not have one image input
                and at least one output.
        """
        trt = import_tensorrt()
        _require_cuda(device)
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise UserError(f"TensorRT engine not found: {self.engine_path}; build it with build_engine()")
        self._trt = trt
        # The runtime holds only a pointer to its logger, so the logger must live as long as it.
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ExportError(
                f"cannot deserialise {self.engine_path.name}: engines only load on the TensorRT version "
                "and GPU model they were built with; rebuild it here"
            )
        self.context = self.engine.create_execution_context()
        self._input, self._outputs = self._io_names()
        spec, self.batch_range = self._input_spec()
        self.metadata = read_engine_sidecar(self.engine_path)
        self._in_dtype = self._torch_dtype(self._input)
        self._out_dtypes = [self._torch_dtype(name) for name in self._outputs]
        super().__init__(
            input_spec=spec,
            precision=precision or str(self.metadata.get("precision", "fp32")),
            device=device,
        )

    def _run(self, x: torch.Tensor) -> Outputs:
        low, high = self.batch_range
        if x.shape[0] < low:
            raise InputSpecError(
                f"{self.name}: the engine's smallest batch is {low}, got {x.shape[0]}; pad the batch "
                "or rebuild with a smaller min_batch"
            )
        return concat([self._execute(chunk) for chunk in x.split(high)])

    def _execute(self, x: torch.Tensor) -> Outputs:
        pixels = x.to(self.device, self._in_dtype).contiguous()
        if self.context.set_input_shape(self._input, tuple(pixels.shape)) is False:
            raise InputSpecError(f"{self.name}: the engine rejected input shape {tuple(pixels.shape)}")
        outputs = [
            torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            for name, dtype in zip(self._outputs, self._out_dtypes)
        ]
        self.context.set_tensor_address(self._input, pixels.data_ptr())
        for name, tensor in zip(self._outputs, outputs):
            self.context.set_tensor_address(name, tensor.data_ptr())
        # Enqueue on torch's current stream, so torch's own ops (the copy to the host in
        # Runner.__call__) are ordered after the engine without an extra synchronisation.
        if not self.context.execute_async_v3(self._stream_handle()):
            raise RuntimeError(f"TensorRT failed to execute {self.engine_path.name}")
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _stream_handle(self) -> int:
        return int(torch.cuda.current_stream(torch.device(self.device)).cuda_stream)

    def _io_names(self) -> tuple[str, list[str]]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == self._trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise ExportError(
                f"{self.engine_path.name}: expected 1 input and at least 1 output, got {inputs} / {outputs}"
            )
        return inputs[0], outputs

    def _input_spec(self) -> tuple[InputSpec, tuple[int, int]]:
        shape = tuple(self.engine.get_tensor_shape(self._input))
        if len(shape) != 4 or any(d < 0 for d in shape[1:]):
            raise ExportError(f"{self.engine_path.name}: input shape {shape} is not (N, C, H, W)")
        if shape[0] >= 0:
            return InputSpec(*shape[1:], batch=shape[0]), (shape[0], shape[0])
        low, _, high = self.engine.get_tensor_profile_shape(self._input, 0)
        return InputSpec(*shape[1:]), (int(low[0]), int(high[0]))

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        for member, torch_dtype in _DTYPES.items():
            if getattr(self._trt.DataType, member, None) == dtype:
                return torch_dtype
        raise ExportError(f"{self.engine_path.name}: tensor {name!r} has unsupported type {dtype}")


def _require_cuda(device: str) -> None:
    if torch.device(device).type != "cuda":
        raise UserError(f"TensorRT runs on CUDA devices only, got device {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False")
