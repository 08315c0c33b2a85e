"""Runner for an ONNX file executed by ONNX Runtime (CPU, or CUDA where that provider exists)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exporters.base import InputSpec, Runner
from exporters.errors import UserError, resource_error
from exporters.outputs import Outputs
from exporters.runtime_spec import RuntimeSpec, register

__all__ = ["OnnxRuntimeRunner"]

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "fp16", "int8")
_CPU, _CUDA, _TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_GPU_PROVIDERS = (_CUDA, _TRT)
# Recipe names of ONNX Runtime's graph optimisation levels.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# ONNX Runtime reports element types as strings; float16 inputs come from fully-cast fp16 files.
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeRunner(Runner):
    """Runs an exported ``.onnx`` file in an ``onnxruntime.InferenceSession``.

    Attributes:
        path: the ONNX file.
        session: the ONNX Runtime session (its options record the thread counts).
        metadata: the file's ``metadata_props`` (see :func:`exporters.onnx.export_onnx`).
        threads: the intra-op thread count the session was created with.
        provider: the execution provider that runs the graph (the session's first one after
            creation: a provider that failed to initialise is not there).
        optimization: the graph optimisation level.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int = 2,
        providers: list[str] | None = None,
        precision: str | None = None,
        spinning: bool = False,
        optimization: str = "all",
        provider_options: list[dict[str, str]] | None = None,
        runtime: str = "onnxruntime",
    ) -> None:
        """Open ``path`` in a new session.

        Args:
            path: an ONNX file with one NCHW image input and one logits output.
            threads: intra-op threads (0 lets ONNX Runtime use every core); inter-op is 1,
                since these graphs are one chain of operators.
            providers: execution providers in order of preference; default CUDA when this
                onnxruntime build has it, then CPU.
            precision: the label reported in results; default the file's ``precision``
                metadata, else ``"fp32"``. An INT8 (Q/DQ) file from the calibration step
                carries ``int8`` there.
            spinning: let idle intra-op threads busy-wait between runs (ONNX Runtime's own
                default). Off by default: the suites interleave ONNX Runtime calls with PyTorch
                work in one process, and spinning threads slow that work down many times over
                on a 2-core machine. Latency benchmarks turn it on, as a deployment would.
            optimization: graph optimisation level (``disable``, ``basic``, ``extended``,
                ``all``); ``all`` includes the CPU layout transform (NCHWc).
            provider_options: one options dict per provider (ONNX Runtime's own keys).
            runtime: the name results are reported under (``onnxruntime-cuda`` and
                ``onnxruntime-tensorrt`` for the GPU execution providers).

        Raises:
            UserError: the file is missing or unreadable, a provider is unknown, ``threads`` is
                negative, ``optimization`` is unknown, or ``precision`` is not fp32/fp16/int8.
        """
        self.path = Path(path)
        if threads < 0:
            raise UserError(f"threads must be >= 0 (0 = all cores), got {threads}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise UserError(f"optimization must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.runtime = runtime
        self.threads = threads
        self.spinning = spinning
        self.optimization = optimization
        requested = self._providers(providers)
        self.session = self._open(requested, provider_options)
        self.provider = self.session.get_providers()[0]
        if self.provider != requested[0]:
            # ONNX Runtime falls back to the next provider when one fails to initialise.
            log.warning("%s: %s did not start; running on %s", self.path.name, requested[0], self.provider)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        first_input = self.session.get_inputs()[0]
        self._input_name = first_input.name
        self._output_names = [output.name for output in self.session.get_outputs()]
        self._input_type = _NUMPY_TYPES.get(first_input.type, np.float32)
        device = "cuda" if self.provider in _GPU_PROVIDERS else "cpu"
        super().__init__(
            input_spec=_spec_from_shape(first_input.shape, self.path),
            precision=self._precision(precision),
            device=device,
        )

    def _run(self, x: torch.Tensor) -> Outputs:
        pixels = np.ascontiguousarray(x.cpu().numpy(), dtype=self._input_type)
        outputs = [
            torch.from_numpy(np.asarray(o))
            for o in self.session.run(self._output_names, {self._input_name: pixels})
        ]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _providers(self, requested: list[str] | None) -> list[str]:
        available = ort.get_available_providers()
        if requested is None:
            return [_CUDA, _CPU] if _CUDA in available else [_CPU]
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise UserError(
                f"ONNX Runtime providers {unknown} are not available in this build; available: {available}"
            )
        return list(requested)

    def _open(
        self, providers: list[str], provider_options: list[dict[str, str]] | None
    ) -> ort.InferenceSession:
        if not self.path.is_file():
            raise UserError(f"ONNX file not found: {self.path}; run the export stage first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _LEVELS[self.optimization]
        try:
            return ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers, provider_options=provider_options
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise resource_error(exc, f"loading {self.path.name} into ONNX Runtime") or UserError(
                f"ONNX Runtime cannot load {self.path}: {first_line}; export the model again (a truncated "
                "or non-ONNX file), or with another export.opset (an op this ONNX Runtime lacks)"
            ) from exc

    def _precision(self, requested: str | None) -> str:
        stored = self.metadata.get("precision")
        precision = requested or stored or "fp32"
        if precision not in _PRECISIONS:
            raise UserError(f"precision must be one of {list(_PRECISIONS)}, got {precision!r}")
        if requested and stored and requested != stored:
            # Reported results would carry the wrong label; say so, but trust the caller.
            log.warning("%s: precision %r requested but the file says %r", self.path.name, requested, stored)
        return precision


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec_from_shape(shape: list[int | str | None], path: Path) -> InputSpec:
    """Session input shape (ints for fixed dims, names or None for symbolic ones) to a spec."""
    dims = list(shape)
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise UserError(f"{path}: input shape {shape} is not (N, C, H, W) with fixed C, H, W")
    channels, height, width = (d for d in dims[1:] if isinstance(d, int))
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return InputSpec(channels=channels, height=height, width=width, batch=batch)


register(RuntimeSpec("onnxruntime", OnnxRuntimeRunner, "onnx", description="ONNX Runtime on the CPU"))
