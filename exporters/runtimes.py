"""The runtime registry: runtime name -> a factory returning a :class:`Runner`.

A new runtime is one file with a Runner subclass plus one ``RUNTIMES.register`` line here.
TensorRT is registered like the others, but its module imports ``tensorrt`` only when a
runner is built, so listing or importing the registry never needs TensorRT or CUDA.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

from exporters.base import Runner
from exporters.engine import tensorrt_runner
from exporters.errors import UserError
from exporters.ort_gpu import ort_cuda_runner, ort_provider_missing, ort_tensorrt_runner
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.registry import Registry
from exporters.tensorrt import INSTALL_HINT
from exporters.torch_runner import TorchRunner

__all__ = ["RUNTIMES", "build_runner", "runtime_available"]

RUNTIMES: Registry[Callable[..., Runner]] = Registry("runtime")
RUNTIMES.register("torch")(TorchRunner)
RUNTIMES.register("onnxruntime")(OnnxRuntimeRunner)
RUNTIMES.register("tensorrt")(tensorrt_runner)
RUNTIMES.register("onnxruntime-cuda")(ort_cuda_runner)
RUNTIMES.register("onnxruntime-tensorrt")(ort_tensorrt_runner)


def _tensorrt_missing() -> str | None:
    if "tensorrt" in sys.modules:  # already imported (or blocked with None)
        installed = sys.modules["tensorrt"] is not None
    else:  # find_spec looks for the package without importing it (that loads CUDA libraries)
        installed = importlib.util.find_spec("tensorrt") is not None
    if not installed:
        return INSTALL_HINT
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is available"
    return None


# Runtimes whose optional dependencies may be missing; the others ship with the package.
_MISSING: dict[str, Callable[[], str | None]] = {
    "tensorrt": _tensorrt_missing,
    "onnxruntime-cuda": lambda: ort_provider_missing("CUDAExecutionProvider"),
    "onnxruntime-tensorrt": lambda: ort_provider_missing("TensorrtExecutionProvider"),
}


def runtime_available(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine, or None if it can.

    Cheap and side-effect free: TensorRT is not imported and CUDA is not initialised (the
    ONNX Runtime providers are read from ``onnxruntime``, a core dependency), so recipe checks
    can call it before any work starts.

    Raises:
        UnknownNameError: ``runtime`` is not registered.
    """
    RUNTIMES.get(runtime)
    check = _MISSING.get(runtime)
    return check() if check else None


def build_runner(runtime: str, **kwargs: Any) -> Runner:
    """Create a runner for ``runtime`` from keyword arguments.

    Args:
        runtime: a registered name: ``"torch"`` (``model``, ``input_spec``, ``device``,
            ``precision``), ``"onnxruntime"`` (``path``, ``threads``, ``providers``,
            ``precision``), ``"onnxruntime-cuda"`` / ``"onnxruntime-tensorrt"`` (``path``,
            ``threads``, ``precision``, ``device``) or ``"tensorrt"`` (``path`` to an ``.onnx``
            or engine file,
            ``precision``, ``device``, build options).
        **kwargs: passed to the runtime's factory.

    Returns:
        The runner.

    Raises:
        UnknownNameError: ``runtime`` is not registered (the message lists the known ones).
        UserError: an argument the runtime does not take, or a required one missing.
        RuntimeUnavailableError: the runtime's optional dependency is not installed.
    """
    factory = RUNTIMES.get(runtime)
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(
            name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD
        )
        raise UserError(f"runtime {runtime!r}: {exc}; it takes: {accepted}") from None
    return factory(**kwargs)
