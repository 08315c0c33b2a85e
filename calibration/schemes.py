"""INT8 quantisation schemes, one per target runtime.

A scheme fixes the integer types and symmetry of the Q/DQ nodes; the calibration method and
data are separate. Which scheme a runtime gets is a measured choice, not a preference:

* ``u8s8`` (ONNX Runtime CPU): unsigned 8-bit activations with a zero point, signed symmetric
  per-channel weights. On this project's CPU (AVX-512 VNNI) ONNX Runtime fuses these Q/DQ
  convolutions into ``QLinearConv`` kernels and runs them about 3x faster than FP32;
  ``s8s8`` convolutions were slower than FP32 there (``bench/bench_latency.py``, README).
* ``s8s8`` (TensorRT): signed symmetric activations and weights, zero point 0, which is what
  TensorRT's explicit quantisation accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporters.errors import UnknownNameError
from exporters.registry import Registry

__all__ = ["RUNTIME_SCHEMES", "SCHEMES", "QuantScheme", "scheme_for_runtime"]


@dataclass(frozen=True)
class QuantScheme:
    """Integer types and symmetry of a Q/DQ model.

    Attributes:
        name: the registry name, written into the model's metadata and the report.
        activation_type: ``"uint8"`` or ``"int8"``.
        weight_type: ``"int8"`` (per-channel capable).
        activation_symmetric: zero point 0 for activations (TensorRT needs it).
        weight_symmetric: zero point 0 for weights.
        description: one line for the report and ``doctor``.
    """

    name: str
    activation_type: str
    weight_type: str
    activation_symmetric: bool
    weight_symmetric: bool
    description: str


SCHEMES: Registry[QuantScheme] = Registry("quantization scheme")
for _scheme in (
    QuantScheme(
        "u8s8",
        "uint8",
        "int8",
        activation_symmetric=False,
        weight_symmetric=True,
        description="uint8 asymmetric activations, int8 symmetric weights (ONNX Runtime CPU kernels)",
    ),
    QuantScheme(
        "s8s8",
        "int8",
        "int8",
        activation_symmetric=True,
        weight_symmetric=True,
        description="int8 symmetric activations and weights, zero point 0 (TensorRT explicit quantization)",
    ),
):
    SCHEMES.register(_scheme.name)(_scheme)

# The scheme each target runtime is quantised with (see the module docstring for why).
RUNTIME_SCHEMES: dict[str, str] = {"onnxruntime": "u8s8", "tensorrt": "s8s8"}


def scheme_for_runtime(runtime: str) -> QuantScheme:
    """The scheme for a target runtime (``onnxruntime`` or ``tensorrt``).

    Raises:
        UnknownNameError: no INT8 scheme is defined for ``runtime``.
    """
    if runtime not in RUNTIME_SCHEMES:
        raise UnknownNameError("INT8 target runtime", runtime, sorted(RUNTIME_SCHEMES))
    return SCHEMES.get(RUNTIME_SCHEMES[runtime])
