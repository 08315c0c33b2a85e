"""The runtime registry: every runtime file's :class:`~exporters.runtime_spec.RuntimeSpec`.

Importing this module imports each runtime's file, which registers its declaration (what its
runner is built from, how, and whether it can run here); a new runtime is one file plus one
line in :data:`_RUNTIME_FILES`. TensorRT is registered like the others, but its module imports
``tensorrt`` only when a runner is built, so listing or importing the registry never needs
TensorRT or CUDA.
"""

from __future__ import annotations

import inspect
from typing import Any

from exporters import engine, ort_gpu, ort_runner, torch_runner
from exporters.base import Runner
from exporters.errors import UserError
from exporters.runtime_spec import RUNTIMES, RuntimeSpec

__all__ = ["RUNTIMES", "RuntimeSpec", "build_runner", "runtime_available"]

#: The modules whose import registers a runtime.
_RUNTIME_FILES = (torch_runner, ort_runner, ort_gpu, engine)


def runtime_available(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine, or None if it can.

    Cheap and side-effect free: TensorRT is not imported and CUDA is not initialised (the
    ONNX Runtime providers are read from ``onnxruntime``, a core dependency), so recipe checks
    can call it before any work starts.

    Raises:
        UnknownNameError: ``runtime`` is not registered.
    """
    return RUNTIMES.get(runtime).missing()


def build_runner(runtime: str, **kwargs: Any) -> Runner:
    """Create a runner for ``runtime`` from keyword arguments.

    Args:
        runtime: a registered name: ``"torch"`` (``model``, ``input_spec``, ``device``,
            ``precision``), ``"onnxruntime"`` (``path``, ``threads``, ``providers``,
            ``precision``, ``spinning``), ``"onnxruntime-cuda"`` / ``"onnxruntime-tensorrt"``
            (``path``, ``threads``, ``precision``, ``device``) or ``"tensorrt"`` (``path`` to an
            ``.onnx`` or engine file, ``precision``, ``device``, build options).
        **kwargs: passed to the runtime's factory.

    Returns:
        The runner.

    Raises:
        UnknownNameError: ``runtime`` is not registered (the message lists the known ones).
        UserError: an argument the runtime does not take, or a required one missing.
        RuntimeUnavailableError: the runtime's optional dependency is not installed.
    """
    factory = RUNTIMES.get(runtime).factory
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(
            name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD
        )
        raise UserError(f"runtime {runtime!r}: {exc}; it takes: {accepted}") from None
    return factory(**kwargs)


def accepts(runtime: str, option: str) -> bool:
    """Whether ``runtime``'s factory takes the keyword ``option`` (e.g. ``spinning``)."""
    return option in inspect.signature(RUNTIMES.get(runtime).factory).parameters
