"""Choosing how to quantise a model by what it does: agreement with the FP32 file on held-out
images, clean and adversarial.

* :func:`choose_method`: the calibration method whose file agrees best (the worse of its clean
  and adversarial agreement, ties to the earlier method in the list).
* :func:`keep_sensitive_fp32`: sensitivity-based mixed precision. Each quantised layer is
  measured by how much agreement the file gains when that layer alone stays in FP32; the most
  sensitive layers are kept in FP32, one at a time (re-measured each time), until the target
  agreement is met or every layer is FP32.

Agreement is measured on ONNX Runtime's CPU provider whatever the file's target runtime, on
images the calibration never saw, so a choice is not fitted to the set it is reported on.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration.qdq import Calibration
from exporters.errors import ExportError

__all__ = [
    "QUANTISABLE_OPS",
    "Agreement",
    "HeldOut",
    "MixedPrecision",
    "choose_method",
    "greedy_fp32",
    "keep_sensitive_fp32",
    "measure_agreement",
]

log = logging.getLogger(__name__)

#: The layers mixed precision may keep in FP32: the ones with weights, where the time goes.
QUANTISABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement with the FP32 file (per image, or per pixel for dense outputs)."""

    clean: float
    adversarial: float | None = None

    @property
    def worst(self) -> float:
        """The lower of the two: a file must hold on both kinds of input."""
        return min(self.clean, self.adversarial if self.adversarial is not None else self.clean)

    def margin(self, target: float, adversarial_target: float | None = None) -> float:
        """How far above its targets the agreement is (negative: short of one)."""
        margin = self.clean - target
        if self.adversarial is not None:
            margin = min(margin, self.adversarial - (adversarial_target or target))
        return margin

    def as_dict(self) -> dict[str, float | None]:
        return {"clean": self.clean, "adversarial": self.adversarial}


@dataclass
class HeldOut:
    """Held-out inputs by kind (``clean``, ``adversarial``) and the FP32 file's labels on them."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, fp32: str | Path, inputs: Mapping[str, np.ndarray], *, threads: int = 1) -> HeldOut:
        """Run the FP32 file once on every kind of input."""
        arrays = {kind: np.ascontiguousarray(x, dtype=np.float32) for kind, x in inputs.items()}
        return cls(arrays, {kind: predict_labels(fp32, x, threads) for kind, x in arrays.items()})


def measure_agreement(path: str | Path, held_out: HeldOut, *, threads: int = 1) -> Agreement:
    """Agreement of the file at ``path`` with the FP32 labels of ``held_out``."""
    shares = {
        kind: float(np.mean(predict_labels(path, x, threads) == held_out.reference[kind]))
        for kind, x in held_out.inputs.items()
    }
    return Agreement(shares["clean"], shares.get("adversarial"))


def choose_method(
    calibration: Calibration,
    methods: Sequence[str],
    held_out: HeldOut,
    *,
    scheme: str,
    per_channel: bool,
    percentile: float,
    exclude_nodes: Sequence[str] = (),
    bias_correction: bool = False,
    threads: int = 1,
) -> tuple[str, dict[str, Agreement]]:
    """The method among ``methods`` whose file agrees best with FP32 on ``held_out`` (each file
    written as the chosen one will be: with ``bias_correction`` when asked).

    Returns:
        The chosen method and the agreement of every method that could write the file (one whose
        quantiser fails on this graph is left out, with a warning; if all fail, the first error
        is raised).
    """
    measured = {}
    failed: dict[str, ExportError] = {}
    with tempfile.TemporaryDirectory(prefix="robustprune-select-") as tmp:
        for method in methods:
            try:
                written = calibration.write(
                    Path(tmp) / f"{method}.onnx",
                    scheme=scheme,
                    method=method,
                    per_channel=per_channel,
                    percentile=percentile,
                    exclude_nodes=exclude_nodes,
                    bias_correction=bias_correction,
                )
            except ExportError as exc:  # a quantiser that cannot handle this graph is not a candidate
                log.warning("calibration method %s failed on %s: %s", method, calibration.source.name, exc)
                failed[method] = exc
                continue
            measured[method] = measure_agreement(written.path, held_out, threads=threads)
    if not measured:
        raise next(iter(failed.values()))
    best = max(measured, key=lambda m: (measured[m].worst, -list(methods).index(m)))
    return best, measured


@dataclass
class MixedPrecision:
    """What :func:`keep_sensitive_fp32` found.

    Attributes:
        target: the agreement asked for on clean held-out images.
        adversarial_target: the agreement asked for on adversarial ones.
        fp32_nodes: the layers kept in FP32, most sensitive first.
        met: the file with them in FP32 reached the target.
        all_int8: agreement with every layer quantised.
        final: agreement with ``fp32_nodes`` in FP32.
        sensitivity: per quantisable layer, the agreement gained by keeping it alone in FP32
            (on the kind of image further from its target).
        methods_fp32_layers: with method ``auto``, per method searched, how many layers it
            kept in FP32 to meet the target (None: it did not meet it with fewer than the best).
    """

    target: float
    adversarial_target: float
    fp32_nodes: list[str]
    met: bool
    all_int8: Agreement
    final: Agreement
    sensitivity: dict[str, float]
    methods_fp32_layers: dict[str, int | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        record = {
            "target": self.target,
            "adversarial_target": self.adversarial_target,
            "fp32_nodes": self.fp32_nodes,
            "met": self.met,
            "all_int8": self.all_int8.as_dict(),
            "final": self.final.as_dict(),
            "sensitivity": self.sensitivity,
        }
        if self.methods_fp32_layers is not None:
            record["methods_fp32_layers"] = self.methods_fp32_layers
        return record


def keep_sensitive_fp32(
    calibration: Calibration,
    held_out: HeldOut,
    target: float,
    *,
    adversarial_target: float | None = None,
    scheme: str,
    method: str,
    per_channel: bool,
    percentile: float,
    exclude_nodes: Sequence[str] = (),
    bias_correction: bool = False,
    threads: int = 1,
    max_fp32: int | None = None,
) -> MixedPrecision:
    """Keep the most sensitive layers in FP32 until agreement reaches ``target``.

    Args:
        calibration: the model and its calibration.
        held_out: images and FP32 labels agreement is measured on.
        target: the agreement (0..1) clean held-out images must reach.
        adversarial_target: the agreement adversarial held-out images must reach (None: ``target``).
        scheme, method, per_channel, percentile: how every file is written.
        exclude_nodes: layers the recipe already keeps in FP32 (never counted as chosen).
        bias_correction: every candidate file bias-corrected, as the final one will be.
        threads: ONNX Runtime threads.
        max_fp32: give up (``met`` false) rather than keep more layers than this in FP32
            (None: every layer if need be; 0: only measure the all-INT8 file).
    """
    fixed = list(exclude_nodes)
    layers = [
        n.name for n in calibration.model.graph.node if n.op_type in QUANTISABLE_OPS and n.name not in fixed
    ]
    with tempfile.TemporaryDirectory(prefix="robustprune-mixed-") as tmp:

        def agreement(fp32_nodes: Sequence[str]) -> Agreement:
            written = calibration.write(
                Path(tmp) / "candidate.onnx",
                scheme=scheme,
                method=method,
                per_channel=per_channel,
                percentile=percentile,
                exclude_nodes=[*fixed, *fp32_nodes],
                bias_correction=bias_correction,
            )
            return measure_agreement(written.path, held_out, threads=threads)

        return greedy_fp32(layers, agreement, target, adversarial_target, max_fp32=max_fp32)


def greedy_fp32(
    layers: Sequence[str],
    agreement: Callable[[Sequence[str]], Agreement],
    target: float,
    adversarial_target: float | None = None,
    *,
    max_fp32: int | None = None,
) -> MixedPrecision:
    """The search of :func:`keep_sensitive_fp32` for any way of measuring a candidate.

    Measures every layer alone in FP32 against the all-INT8 candidate, then keeps layers in FP32,
    most sensitive first, until ``agreement`` (of the candidate with those layers in FP32) meets
    both targets, or ``max_fp32`` layers are kept (``met`` false).
    """
    adv_target = adversarial_target if adversarial_target is not None else target

    def margin(a: Agreement) -> float:
        return a.margin(target, adv_target)

    base = agreement([])
    if margin(base) >= 0 or max_fp32 == 0:
        return MixedPrecision(target, adv_target, [], margin(base) >= 0, base, base, {})
    sensitivity = {layer: margin(agreement([layer])) - margin(base) for layer in layers}
    order = sorted(layers, key=lambda layer: -sensitivity[layer])
    kept: list[str] = []
    final = base
    for layer in order[:max_fp32]:
        kept.append(layer)
        final = agreement(kept)
        if margin(final) >= 0:
            break
    return MixedPrecision(target, adv_target, kept, margin(final) >= 0, base, final, sensitivity)


def fewest_fp32(
    calibration: Calibration,
    measured: Mapping[str, Agreement],
    held_out: HeldOut,
    target: float,
    *,
    adversarial_target: float | None = None,
    **options: Any,
) -> tuple[str, MixedPrecision]:
    """Method ``auto`` with a target: the method that meets it keeping the fewest layers in FP32.

    The method whose all-INT8 file agrees best is not always the one that needs fewest FP32
    layers: a method whose errors sit in one layer (often the classifier) meets the target by
    keeping that layer, where one whose errors are spread over every layer may need them all.
    Methods are searched best all-INT8 agreement first, each allowed one layer fewer than the
    best so far (so a later method costs only its all-INT8 file once the best needs one layer);
    ties go to the earlier, better-agreeing method. When none meets the target, the first
    method's search is returned (``met`` false).

    Args:
        calibration: the model and its calibration.
        measured: each candidate method's all-INT8 agreement (:func:`choose_method`'s).
        held_out: images and FP32 labels agreement is measured on.
        target, adversarial_target: as :func:`keep_sensitive_fp32`.
        **options: the other :func:`keep_sensitive_fp32` arguments (scheme, per_channel, ...).
    """
    adv_target = adversarial_target if adversarial_target is not None else target
    order = sorted(measured, key=lambda m: -measured[m].margin(target, adv_target))
    searched: dict[str, MixedPrecision] = {}
    best = order[0]  # returned unmet when no method meets the target
    for method in order:
        bound = len(searched[best].fp32_nodes) - 1 if best in searched and searched[best].met else None
        if bound is not None and bound < 0:
            break
        searched[method] = keep_sensitive_fp32(
            calibration,
            held_out,
            target,
            adversarial_target=adv_target,
            method=method,
            max_fp32=bound,
            **options,
        )
        if searched[method].met:
            best = method
    counts = {m: len(found.fp32_nodes) if found.met else None for m, found in searched.items()}
    return best, replace(searched[best], methods_fp32_layers=counts)


def predict_labels(path: str | Path, x: np.ndarray, threads: int) -> np.ndarray:
    """Arg-max over the first output's class axis, in batches the file accepts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    fixed = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
    step = fixed or 64
    outputs = [session.run(None, {feed.name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outputs).argmax(1)
