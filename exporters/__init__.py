"""Export and runtimes: every runtime is a :class:`exporters.base.Runner`.

Modules: ``onnx`` (export, metadata, parity), ``runtimes`` (the ``RUNTIMES`` registry and
``build_runner``), one runner per file (``torch_runner``, ``ort_runner``, ``tensorrt_runner``),
``tensorrt`` (engine build), ``engine`` (cached engines), ``errors`` and ``registry`` (shared
with ``calibration`` and ``toolchain``). Importing this package stays light: it loads neither
torch, ONNX Runtime nor TensorRT (``InputSpec`` and ``Runner`` are imported on first use), and
never initialises CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporters.base import InputSpec, Runner

__all__ = ["InputSpec", "Runner"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from exporters import base

        return getattr(base, name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
