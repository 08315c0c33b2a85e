"""Static INT8 quantisation of an exported ONNX file into a Q/DQ ONNX file (ONNX Runtime tools).

The file that comes out is an ordinary ONNX model with QuantizeLinear/DequantizeLinear pairs
around every quantised tensor: ONNX Runtime fuses them into integer kernels where it can, and
TensorRT builds an explicit-precision INT8 engine from it. Its metadata keeps the source file's
(input range, classes, mean/std) and adds ``precision: int8``, the scheme and how it was
calibrated, so a runner or a report needs nothing else to interpret it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.bias import BiasCorrection, biased_layers, correct_bias, layer_means
from calibration.nncf_ptq import NNCF_SCHEMES, nncf_quantize
from calibration.ranges import (
    Histogram,
    calibration_tensors,
    collect_histograms,
    compute_range,
    range_methods,
)
from calibration.schemes import RUNTIME_SCHEMES, SCHEMES, QuantScheme
from exporters.errors import ExportError, UserError, resource_error
from exporters.onnx import INPUT_NAME, load_onnx

__all__ = [
    "Calibration",
    "QuantizeResult",
    "calibrate",
    "quantize_methods",
    "quantize_onnx",
    "range_methods",
    "supports",
]

log = logging.getLogger(__name__)

_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
#: The method that hands the whole file to NNCF's post-training quantisation.
NNCF = "nncf"


def quantize_methods() -> list[str]:
    """Every calibration method a file can be written with: the range methods, whose ranges ONNX
    Runtime's quantiser applies (:mod:`calibration.ranges`), and ``nncf`` (:mod:`calibration.nncf_ptq`)."""
    return [*range_methods(), NNCF]


def supports(method: str, scheme: str) -> bool:
    """Whether ``method`` can write a file of ``scheme`` (every method but nncf writes every scheme)."""
    return method != NNCF or scheme in NNCF_SCHEMES


def _check_method(method: str, scheme: str) -> None:
    if method not in quantize_methods():
        raise UserError(f"calibration method must be one of {quantize_methods()}, got {method!r}")
    if not supports(method, scheme):
        raise UserError(
            f"calibration method nncf writes {'/'.join(NNCF_SCHEMES)} files (ONNX Runtime) only, not "
            f"{scheme}: NNCF keeps post-ReLU activations unsigned, which TensorRT's explicit quantization "
            "does not take; use a range method (minmax, percentile, entropy, mse) for the tensorrt target"
        )


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote.

    Attributes:
        path: the Q/DQ ONNX file.
        scheme: the scheme's name.
        method: the calibration method.
        per_channel: per-channel weight scales.
        samples: calibration images used.
        quantized_nodes: count per op type of the nodes that got Q/DQ inputs (Conv, Gemm, ...).
        excluded_nodes: the node names kept in float, as asked.
        bias_shift: with bias correction, per corrected layer the mean |shift| subtracted from
            its bias over its channels (:mod:`calibration.bias`); None without.
    """

    path: Path
    scheme: str
    method: str
    per_channel: bool
    samples: int
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    bias_shift: dict[str, float] | None = None

    @property
    def bias_correction(self) -> bool:
        return self.bias_shift is not None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


@dataclass
class Calibration:
    """An FP32 file made ready for quantisation, and what its tensors did on the calibration set.

    One calibration serves every method, scheme and set of excluded nodes: the histograms are
    collected once (:func:`calibrate`), each Q/DQ file is written from them (:meth:`write`).

    Attributes:
        source: the FP32 file.
        model: the graph that is quantised (pre-processed when asked: shapes inferred, BatchNorm
            folded into the convolutions).
        histograms: per calibrated tensor, its values on the calibration images.
        samples: calibration images.
        feeds: the calibration images as the file takes them (one ``{input: batch}`` per run),
            which bias correction runs the FP32 and the quantised graph on.
    """

    source: Path
    model: onnx.ModelProto
    histograms: dict[str, Histogram]
    samples: int
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    # The FP32 layers' per-channel means on ``feeds``: the same for every file written.
    _fp32_means: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.model.graph.node]

    def ranges(self, method: str, percentile: float = 99.99) -> dict[str, tuple[float, float]]:
        """Each tensor's ``(low, high)`` under ``method`` (see :mod:`calibration.ranges`).

        The graph's outputs keep their observed range whatever the method: clipping the logits
        would make the largest ones equal, so the arg-max becomes a tie."""
        outputs = {o.name for o in self.model.graph.output}
        return {
            name: compute_range("minmax" if name in outputs else method, h, percentile)
            for name, h in self.histograms.items()
        }

    def write(
        self,
        dst: str | os.PathLike[str],
        *,
        scheme: str = "u8s8",
        method: str = "minmax",
        per_channel: bool = True,
        percentile: float = 99.99,
        exclude_nodes: Sequence[str] = (),
        bias_correction: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> QuantizeResult:
        """Write the Q/DQ file with ``method``'s ranges, keeping ``exclude_nodes`` in float, and
        with ``bias_correction`` each INT8 layer's mean output shift taken out of its bias
        (:func:`calibration.bias.correct_bias`, on the calibration images).

        ``method="nncf"`` hands the graph and the calibration images to NNCF instead, whose file
        comes with NNCF's own fast bias correction (``bias_correction`` measures and removes what
        shift is left after it, as for any other method).

        Raises:
            UserError: unknown scheme, method or node names; bias correction of a calibration
                made without its images.
            ExportError: ONNX Runtime's quantiser failed.
        """
        chosen: QuantScheme = SCHEMES.get(scheme)
        _check_method(method, chosen.name)
        names = set(self.node_names)
        unknown = sorted(set(exclude_nodes) - names)
        if unknown:
            raise UserError(
                f"exclude_nodes {unknown} are not nodes of the (pre-processed) graph; "
                f"node names: {', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''}"
            )
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if method == NNCF:
            quantized = self._nncf(per_channel, exclude_nodes)
        else:
            quantized = _quantize(self, chosen, self.ranges(method, percentile), per_channel, exclude_nodes)
        # A file for ONNX Runtime's CPU is corrected as its integer kernels compute it; a file
        # for TensorRT as its Q/DQ nodes define it (TensorRT compiles them its own way).
        fused = chosen.name == RUNTIME_SCHEMES["onnxruntime"]
        shifts = self._correct_bias(quantized, fused) if bias_correction else None
        if shifts is not None:
            quantized = shifts.model
        counts = quantized_node_counts(quantized)
        props = {p.key: p.value for p in load_onnx(self.source).metadata_props}
        props.update(
            {
                "precision": "int8",
                "quant_scheme": chosen.name,
                "quant_method": method,
                "quant_per_channel": json.dumps(per_channel),
                "quant_samples": str(self.samples),
                "quant_source": self.source.name,
            }
        )
        if bias_correction:
            props["quant_bias_correction"] = "true"
        props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
        onnx.helper.set_model_props(quantized, props)
        _save_atomic(quantized, dst)
        log.info(
            "quantized %s -> %s (%s, %s, %d images): %s",
            self.source.name,
            dst,
            scheme,
            method,
            self.samples,
            counts,
        )
        return QuantizeResult(
            path=dst,
            scheme=chosen.name,
            method=method,
            per_channel=per_channel,
            samples=self.samples,
            quantized_nodes=counts,
            excluded_nodes=list(exclude_nodes),
            bias_shift=shifts.summary() if shifts is not None else None,
        )

    def _nncf(self, per_channel: bool, exclude_nodes: Sequence[str]) -> onnx.ModelProto:
        if not self.feeds:
            raise UserError("calibration method nncf needs the calibration images: use calibrate()")
        return nncf_quantize(
            self.model,
            self.feeds,
            per_channel=per_channel,
            exclude_nodes=exclude_nodes,
            name=self.source.name,
        )

    def _correct_bias(self, quantized: onnx.ModelProto, fused: bool) -> BiasCorrection:
        if not self.feeds:
            raise UserError("bias correction needs the calibration images: prepare the file with calibrate()")
        if self._fp32_means is None:
            layers = biased_layers(self.model)
            self._fp32_means = layer_means(
                self.model, {layer.output: layer.axis for layer in layers}, self.feeds, optimize=False
            )
        return correct_bias(self.model, quantized, self.feeds, fp32_means=self._fp32_means, fused=fused)


def calibrate(
    src: str | os.PathLike[str],
    images: np.ndarray,
    *,
    preprocess: bool = True,
    batch_size: int = 32,
) -> Calibration:
    """Prepare ``src`` for quantisation and collect its tensors' values on ``images``.

    Args:
        src: an FP32 ONNX file (one NCHW pixel input, as :func:`exporters.onnx.export_onnx`
            writes).
        images: float32 ``(N, C, H, W)`` calibration pixels in [0, 1].
        preprocess: run ONNX Runtime's quantisation pre-processing first (shape inference and
            graph optimisation, which folds BatchNorm into the convolutions so they quantise
            as one op).
        batch_size: calibration batch size (a fixed-batch file is fed one image at a time).

    Raises:
        UserError: bad images, or the file is missing or unreadable.
        ExportError: pre-processing failed.
    """
    from onnxruntime import quantization as ortq  # heavy; only when quantising

    src = Path(src)
    source = load_onnx(src)
    input_name, fixed_batch = _image_input(source, src)
    images = _check_images(images, source, src)
    with tempfile.TemporaryDirectory(prefix="robustprune-qdq-") as tmp:
        model_in = Path(tmp) / "pre.onnx"
        try:
            if preprocess:
                ortq.quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
                model = onnx.load(str(model_in))
            else:
                model = onnx.shape_inference.infer_shapes(source)
        except Exception as exc:  # the pre-processor raises many unrelated types
            raise resource_error(exc, f"pre-processing {src.name} for INT8") or ExportError(
                f"INT8 pre-processing of {src.name} failed: {_first_line(exc)}"
            ) from exc
    step = 1 if fixed_batch else batch_size
    feeds = [{input_name: images[i : i + step]} for i in range(0, len(images), step)]
    histograms = collect_histograms(model, feeds, calibration_tensors(model))
    return Calibration(src, model, histograms, len(images), feeds)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    images: np.ndarray,
    *,
    scheme: str = "u8s8",
    method: str = "minmax",
    per_channel: bool = True,
    percentile: float = 99.99,
    exclude_nodes: Sequence[str] = (),
    bias_correction: bool = False,
    preprocess: bool = True,
    batch_size: int = 32,
    metadata: dict[str, Any] | None = None,
) -> QuantizeResult:
    """Write a static INT8 Q/DQ copy of ``src`` to ``dst``, calibrated on ``images``
    (:func:`calibrate`, then :meth:`Calibration.write`).

    Args:
        src, images, preprocess, batch_size: as :func:`calibrate`.
        dst: where to write the Q/DQ file (atomically; parent folders are created).
        scheme: a name in :data:`calibration.schemes.SCHEMES`.
        method: a name in :func:`quantize_methods` (``minmax``, ``percentile``, ``entropy``, ``mse``,
            ``nncf``).
        per_channel: one weight scale per output channel (recommended for convolutions).
        percentile: the share of values ``method="percentile"`` keeps.
        exclude_nodes: node names (of the pre-processed graph) to keep in float.
        bias_correction: subtract each INT8 layer's mean output shift on ``images`` from its
            bias (:mod:`calibration.bias`).
        metadata: extra ``metadata_props`` (non-strings stored as JSON).

    Returns:
        A :class:`QuantizeResult`.

    Raises:
        UserError: unknown scheme, method or node, bad images, or the file is missing or unreadable.
        ExportError: ONNX Runtime's quantiser failed.
    """
    _check_method(method, SCHEMES.get(scheme).name)  # bad names are refused before any work
    calibration = calibrate(src, images, preprocess=preprocess, batch_size=batch_size)
    return calibration.write(
        dst,
        scheme=scheme,
        method=method,
        per_channel=per_channel,
        percentile=percentile,
        exclude_nodes=exclude_nodes,
        bias_correction=bias_correction,
        metadata=metadata,
    )


def _quantize(
    calibration: Calibration,
    scheme: QuantScheme,
    ranges: dict[str, tuple[float, float]],
    per_channel: bool,
    exclude_nodes: Sequence[str],
) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_static`` with our ranges, handed over as its calibration cache."""
    from onnxruntime import quantization as ortq
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {
        name: TensorData(lowest=np.float32(low), highest=np.float32(high))
        for name, (low, high) in ranges.items()
    }
    with tempfile.TemporaryDirectory(prefix="robustprune-qdq-") as tmp:
        cache, model_in, out = Path(tmp) / "ranges.json", Path(tmp) / "in.onnx", Path(tmp) / "qdq.onnx"
        save_tensors_data(TensorsData(ortq.CalibrationMethod.MinMax, data), cache)
        onnx.save(calibration.model, str(model_in))
        try:
            ortq.quantize_static(
                str(model_in),
                str(out),
                None,
                quant_format=ortq.QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=getattr(ortq.QuantType, _QUANT_TYPES[scheme.activation_type]),
                weight_type=getattr(ortq.QuantType, _QUANT_TYPES[scheme.weight_type]),
                nodes_to_exclude=list(exclude_nodes),
                calibrate_method=ortq.CalibrationMethod.MinMax,
                calibration_cache_path=cache,
                extra_options={
                    "ActivationSymmetric": scheme.activation_symmetric,
                    "WeightSymmetric": scheme.weight_symmetric,
                },
            )
        except Exception as exc:  # the quantiser raises many unrelated types
            raise resource_error(exc, f"quantizing {calibration.source.name}") or ExportError(
                f"INT8 quantization of {calibration.source.name} failed: {_first_line(exc)}"
            ) from exc
        return onnx.load(str(out))


def quantized_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count, per op type, the compute nodes whose data input comes from a DequantizeLinear."""
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.input and node.input[0] in dequantized:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _image_input(model: onnx.ModelProto, path: Path) -> tuple[str, bool]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, found {len(inputs)}")
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    fixed = batch_dim.HasField("dim_value") and batch_dim.dim_value > 0
    return inputs[0].name or INPUT_NAME, fixed


def _check_images(images: Any, model: onnx.ModelProto, path: Path) -> np.ndarray:
    array = np.asarray(images)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if array.ndim != 4 or len(array) == 0 or list(array.shape[1:]) != dims[1:]:
        raise UserError(
            f"calibration images must be a non-empty (N, {', '.join(map(str, dims[1:]))}) array for "
            f"{path.name}, got shape {tuple(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"calibration images must be float pixels in [0, 1], got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
