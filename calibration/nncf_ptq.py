"""NNCF's post-training quantisation of an ONNX graph, as the calibration method ``nncf``.

``nncf.quantize`` (Intel's Neural Network Compression Framework, ONNX back end) chooses where
Q/DQ pairs go and each activation's range from the calibration images itself, then applies its
fast bias correction (each quantised layer's mean output shift against FP32 taken out of its
bias). On this project's 4x ResNet-18 it agreed with FP32 on 98.8% of validation images with
every layer INT8, where ``quantize_static`` with our ranges reached 89.2% at best
(``bench/results/int8_nncf.json``), so ``auto`` measures it beside the range methods.

Its ``mixed`` preset is used (int8 symmetric per-channel weights, asymmetric activations), with
two changes that make the file the ``u8s8`` scheme ONNX Runtime's CPU kernels take, since a
convolution they cannot fuse runs in float between its Q/DQ nodes, slower than the FP32 file
(without them, NNCF's file of a MobileNetV2 ran 13 of its 52 convolutions as integer kernels,
3-4x slower than FP32):

* activations per tensor: NNCF gives the input of a depthwise convolution one scale per channel,
  which ``QLinearConv`` does not take;
* activations in uint8: NNCF writes a signed range as int8 with a zero point, and ONNX Runtime
  fuses a convolution only when its input and output have the same type. An int8 quantiser
  with zero point ``z`` is the same grid as a uint8 one with zero point ``z + 128``, so the
  conversion changes no value.

NNCF keeps activations that follow a ReLU unsigned whatever it is asked (its hardware
configurations refuse signed ones there), so it cannot write the ``s8s8`` files TensorRT's
explicit quantisation takes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

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
        weights_quantization_params=QuantizationParameters(per_channel=per_channel),
        activations_quantization_params=QuantizationParameters(per_channel=False),
    )
    try:
        # NNCF draws progress bars on standard output; the stage reports its own progress.
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(
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
    return unsigned_activations(quantized)


def unsigned_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every int8 activation quantiser (a QuantizeLinear, and the
    DequantizeLinear nodes reading it) made uint8 with its zero point moved by 128: the same
    values, in the type ONNX Runtime's integer kernels pair with uint8 inputs (module docstring).
    Weights (DequantizeLinear of an int8 initialiser) are left as they are. Modified in place."""
    inits = {init.name: init for init in model.graph.initializer}
    typed = {info.name: info for info in [*model.graph.value_info, *model.graph.output]}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], []).append(node)
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zero = numpy_helper.to_array(inits[node.input[2]])
        if zero.dtype != np.int8:
            continue
        name = f"{node.input[2]}_uint8"
        if name not in inits:
            shifted = (zero.astype(np.int16) + 128).astype(np.uint8)
            inits[name] = numpy_helper.from_array(shifted, name)
            model.graph.initializer.append(inits[name])
        node.input[2] = name
        if node.output[0] in typed:  # the type shape inference recorded for the quantised tensor
            typed[node.output[0]].type.tensor_type.elem_type = onnx.TensorProto.UINT8
        for reader in readers.get(node.output[0], []):
            if len(reader.input) >= 3:
                reader.input[2] = name
    return model
