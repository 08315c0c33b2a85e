"""NNCF's post-training quantisation of an ONNX graph, as the calibration method ``nncf``.

``nncf.quantize`` (Intel's Neural Network Compression Framework, ONNX back end) chooses where
Q/DQ pairs go and each activation's range from the calibration images itself, then applies its
fast bias correction (each quantised layer's mean output shift against FP32 taken out of its
bias). On this project's 4x ResNet-18 it agreed with FP32 on 98.8% of validation images with
every layer INT8, where ``quantize_static`` with our ranges reached 89.2% at best
(``bench/results/int8_nncf.json``), so ``auto`` measures it beside the range methods.

Its ``mixed`` preset is used: int8 symmetric per-channel weights, uint8 activations with a zero
point, which is the ``u8s8`` scheme ONNX Runtime's CPU kernels take. NNCF keeps activations that
follow a ReLU unsigned whatever it is asked (its hardware configurations refuse signed ones
there), so it cannot write the ``s8s8`` files TensorRT's explicit quantisation takes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import onnx

from exporters.errors import ExportError, UserError, resource_error

__all__ = ["NNCF_SCHEMES", "nncf_quantize"]

#: The schemes NNCF's files follow (see the module docstring for why not ``s8s8``).
NNCF_SCHEMES = ("u8s8",)


def nncf_quantize(
    model: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    exclude_nodes: Sequence[str] = (),
    name: str = "model",
) -> onnx.ModelProto:
    """The Q/DQ graph NNCF makes of ``model`` from the calibration batches ``feeds``.

    Args:
        model: the (pre-processed) FP32 graph; not modified.
        feeds: the calibration images as the graph takes them, one ``{input: batch}`` per run
            (every batch is used: NNCF's subset size counts batches).
        per_channel: one weight scale per output channel.
        exclude_nodes: node names kept in float (NNCF's ignored scope).
        name: the file's name, for messages.

    Raises:
        UserError: nncf is not installed.
        ExportError: NNCF failed on this graph.
    """
    # Importing nncf imports torch's extension builder, which warns on every CPU-only machine
    # that it found no CUDA runtime; nothing here builds an extension.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )
    except ImportError as exc:
        raise UserError(
            f"calibration method nncf needs the nncf package ({exc}): pip install 'nncf>=3.4,<4', "
            "or choose another quantize.method"
        ) from exc
    logging.getLogger("nncf").setLevel(logging.WARNING)
    source = onnx.ModelProto()
    source.CopyFrom(model)
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=per_channel)
    )
    try:
        # NNCF draws progress bars on standard output; the stage reports its own progress.
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(
                source,
                nncf.Dataset(list(feeds)),
                preset=nncf.QuantizationPreset.MIXED,
                subset_size=len(feeds),
                ignored_scope=nncf.IgnoredScope(names=list(exclude_nodes)) if exclude_nodes else None,
                advanced_parameters=advanced,
            )
    except Exception as exc:  # NNCF raises many unrelated types
        raise resource_error(exc, f"quantizing {name} with NNCF") or ExportError(
            f"NNCF's quantization of {name} failed: {type(exc).__name__}: {str(exc).strip()[:300]}"
        ) from exc
