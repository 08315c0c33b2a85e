"""Export and runtimes: every runtime is a :class:`exporters.base.Runner`.

Modules: ``onnx`` (export, metadata, parity), ``runtimes`` (the ``RUNTIMES`` registry and
``build_runner``), one runner per file (``torch_runner``, ``ort_runner``, ``tensorrt_runner``),
``tensorrt`` (engine build), ``errors``. Importing this package stays light: it loads neither
ONNX Runtime nor TensorRT, and never initialises CUDA.
"""

from exporters.base import InputSpec, Runner

__all__ = ["InputSpec", "Runner"]
