"""report.json (schema ``robustprune.report/1``), typed in one place.

The suite, the pipeline, ``validate``, the gates, ``compare`` and the Markdown and HTML
renderers all build or read the report through these models, never through loose dicts.

Rules that keep the schema stable for CI:

* Keys are added, never renamed (renaming bumps :data:`SCHEMA`). To add a key, add a field
  with a default to the right model: older reports then still load.
* Every record allows extra keys (``extra="allow"``): a key written by a newer robustprune,
  or added by hand, survives a load and a re-write.
* Optional keys listed in a record's ``omit_if_none`` are left out of the JSON while unset,
  so a report only carries the keys that apply to it (a bare engine has no ``arch``).

This module stays light (pydantic only): anything may import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from toolchain.errors import UserError

SCHEMA = "robustprune.report/1"

#: ``status`` of a report written at the end of a run that finished every stage.
COMPLETED: Literal["completed"] = "completed"
#: ``status`` a run writes over its previous report before it starts: not a verdict any more.
STALE: Literal["stale"] = "stale"


class Record(BaseModel):
    """Base of every report record: extra keys allowed, unset optional keys left out."""

    model_config = ConfigDict(extra="allow")
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_optionals(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for key in self.omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (what report.json holds)."""
        return self.model_dump(mode="json")


class Environment(Record):
    """Versions and the device the numbers were measured on."""

    torch: str | None = Field(None, description="PyTorch version")
    torch_pruning: str | None = Field(None, description="torch-pruning version")
    onnx: str | None = Field(None, description="onnx version")
    onnxruntime: str | None = Field(None, description="ONNX Runtime version")
    tensorrt: str | None = Field(None, description="TensorRT version (null if absent)")
    nncf: str | None = Field(None, description="NNCF version (the quantize stage's nncf calibration method)")
    robustprune: str | None = Field(None, description="robustprune version")
    device: str = Field(
        "cpu",
        description="the devices the evaluations and latency rows really ran on, comma-separated (cpu, "
        "cuda:0)",
    )
    threads: int | None = Field(None, description="ONNX Runtime intra-op threads of the validation")
    devices: list[str] | None = Field(None, description="the same devices as a list")


class DenseModel(Record):
    """The dense model's size (MACs for one image) and its output channels per layer."""

    omit_if_none = frozenset({"channels"})
    macs: int = Field(0, description="multiply-accumulates for one image (torch-pruning's count)")
    params: int = Field(0, description="parameters")
    channels: dict[str, int] | None = Field(None, description="output channels per Conv/Linear layer")


class PrunedModel(DenseModel):
    """The pruned model: the pruning method, size, reductions (dense / pruned) and whether the
    budget was met.

    ``target_met``: the achieved reduction of the target's metric is at least
    ``target * (1 - tolerance)``; more reduction than asked is still within budget.
    ``None`` when no target was recorded (then the intrinsic budget gate fails closed).
    ``latency``: for a ``latency_reduction`` target, the pruned model timed against the dense
    one (``runtime``, ``batch``, ``threads``, ``dense_ms``, ``pruned_ms``,
    ``measured_reduction``, ``predicted_reduction``) and the search's probes (``search``).
    """

    omit_if_none = frozenset({"channels", "tolerance", "method", "info", "latency"})
    method: str | None = Field(None, description="the pruning method (prune.method)")
    macs_reduction: float = Field(0.0, description="dense MACs / pruned MACs")
    params_reduction: float = Field(0.0, description="dense parameters / pruned parameters")
    target: dict[str, float] | None = Field(
        None, description="the budget the prune stage aimed at, e.g. {macs_reduction: 4.0}"
    )
    tolerance: float | None = Field(None, description="the recipe's prune.tolerance")
    target_met: bool | None = Field(
        None,
        description="every reduction in target achieved at least target * (1 - tolerance); more reduction "
        "than asked is within budget; null if no target was recorded (the budget-met gate then "
        "fails)",
    )
    steps: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per pruning step: target_reduction, ratio, macs, params, macs_reduction, "
        "params_reduction, timings",
    )
    info: dict[str, Any] | None = Field(
        None,
        description="the method's own record (mrs: group sensitivities and keep ratios; lowrank: ranks; "
        "hydra: score changes)",
    )
    latency: dict[str, Any] | None = Field(
        None,
        description="latency_reduction targets only: runtime, batch, threads, dense_ms, pruned_ms (medians,"
        " timed interleaved), measured_reduction, predicted_reduction (the search curve at the "
        "achieved MACs), search (macs_reduction handed to the method, probes[])",
    )


class Models(Record):
    """``models``: empty for a bare engine validated on its own."""

    omit_if_none = frozenset({"dense", "pruned"})
    dense: DenseModel | None = Field(None, description="the dense model (absent for a bare engine)")
    pruned: PrunedModel | None = Field(None, description="the pruned model (absent for a bare engine)")


class Float64Parity(Record):
    """Only when ``max_abs_diff`` exceeds ``export.parity_atol``: the largest logit difference of
    float32 PyTorch and of ONNX Runtime from the same model run in float64, and how often each
    picks float64's class (an engine about as far from float64 as PyTorch is differs by float32
    rounding, not by a wrong export)."""

    torch_fp32_max_abs_diff: float = Field(
        description="largest |logit difference| of float32 PyTorch from float64 PyTorch"
    )
    engine_max_abs_diff: float = Field(
        description="largest |logit difference| of the ONNX file from float64 PyTorch"
    )
    torch_fp32_top1_agreement: float | None = Field(
        None, description="share of images where float32 PyTorch picks float64's class"
    )
    engine_top1_agreement: float | None = Field(
        None, description="share of images where the ONNX file picks float64's class"
    )


class ExportParity(Record):
    """The export stage's parity check of an ONNX file against its PyTorch model.

    ``max_abs_diff`` / ``mean_abs_diff`` are null when the engine returned NaN or Inf.
    ``reference_max_abs`` is the largest PyTorch logit, the scale of the differences (absent in
    reports written before it was recorded; null when PyTorch returned NaN or Inf). ``float64``:
    see :class:`Float64Parity`.
    """

    omit_if_none = frozenset({"reference_max_abs", "float64", "end_to_end_agreement"})
    max_abs_diff: float | None = Field(
        None,
        description="largest |logit difference| between the ONNX file and PyTorch (null when the engine "
        "returned NaN/Inf)",
    )
    mean_abs_diff: float | None = Field(
        None, description="mean |logit difference| (null when the engine returned NaN/Inf)"
    )
    top1_agreement: float = Field(
        0.0, description="share of images (segmentation: pixels) with the same arg-max"
    )
    samples: int = Field(0, description="validation images compared")
    reference_max_abs: float | None = Field(
        None, description="the largest PyTorch logit: the scale of the differences"
    )
    within_atol: bool = Field(False, description="max_abs_diff is within export.parity_atol")
    float64: Float64Parity | None = Field(
        None, description="only beyond parity_atol: both sides against the same model run in float64"
    )
    end_to_end_agreement: float | None = Field(
        None,
        description="export.end_to_end only: share of confident detections of the end-to-end file "
        "matched by the raw file's, post-processed on the host",
    )


class AttackRow(Record):
    """One attack on one runner: ``accuracy`` counts images correct clean *and* attacked.

    ``ensemble`` names the ensemble (e.g. ``autoattack-lite``) the attack was expanded from.
    Segmentation: ``accuracy`` is the pixel accuracy on the attacked images (every image is
    attacked), ``miou`` their mIoU and ``clean_miou`` the mIoU of the same images clean.
    Detection: ``accuracy`` is the share of objects still found (a confident detection of
    their class at IoU 0.5), ``map``/``map50`` the COCO mAP@[.5:.95] / mAP@.5 under attack,
    ``clean_map`` the mAP of the same images clean, and ``vanishing_rate`` the share of the
    objects found clean that the attack made disappear.
    """

    omit_if_none = frozenset(
        {"ensemble", "miou", "clean_miou", "map", "map50", "clean_map", "vanishing_rate"}
    )
    name: str = Field(description="the attack (pgd, fgsm, apgd, apgd-t, square, segpgd, ...)")
    mode: Literal["white-box", "transfer", "black-box"] = Field(
        description="white-box (crafted and scored on PyTorch), transfer (PyTorch's examples replayed on "
        "this engine) or black-box (run against this runtime)"
    )
    norm: str = Field(description="linf or l2")
    eps: float = Field(description="perturbation budget in pixel units")
    steps: int = Field(0, description="iterations (white-box)")
    queries: float = Field(0.0, description="mean model queries per image (black-box)")
    samples: int = Field(0, description="images attacked")
    accuracy: float = Field(
        description="share of images correct clean and correct after the attack (segmentation: pixel "
        "accuracy on the attacked images)"
    )
    ensemble: str | None = Field(None, description="the ensemble this attack is part of (autoattack-lite)")
    miou: float | None = Field(None, description="segmentation: mIoU on the attacked images")
    clean_miou: float | None = Field(
        None, description="segmentation: mIoU of the same images clean (compare the attack's miou with this)"
    )
    map: float | None = Field(None, description="detection: COCO mAP@[.5:.95] on the attacked images")
    map50: float | None = Field(None, description="detection: mAP@.5 on the attacked images")
    clean_map: float | None = Field(None, description="detection: mAP@[.5:.95] of the same images clean")
    vanishing_rate: float | None = Field(
        None, description="detection: share of the objects found clean that the attack made disappear"
    )


class RobustAccuracy(Record):
    """Per-image worst case over every attack run at one budget (the field's robust accuracy).

    An image counts only if it is classified correctly clean and survives every attack in
    ``attacks``, on the images all of them saw (``samples``: with sample caps, the first
    ``min(cap)`` images of the stream).
    """

    omit_if_none = frozenset({"missing"})

    norm: str = Field(description="linf or l2")
    eps: float = Field(description="the budget")
    accuracy: float = Field(
        description="share of images correct clean that survive every attack at this budget"
    )
    samples: int = Field(description="images all of those attacks saw")
    attacks: list[str] = Field(description="the attacks taken into account")
    missing: list[str] | None = Field(
        None,
        description="the recipe's attacks at this budget that did not run here (see skipped); a gate on "
        "this entry then fails unless its selector names the attacks it covers",
    )


class RobustMiou(Record):
    """Segmentation: the lowest mIoU among the attacks run at one budget (``samples``: the
    fewest images any of them saw)."""

    omit_if_none = frozenset({"missing"})

    norm: str = Field(description="linf or l2")
    eps: float = Field(description="the budget")
    miou: float = Field(description="the lowest mIoU among the attacks at this budget")
    samples: int = Field(description="the fewest images any of them saw")
    attacks: list[str] = Field(description="the attacks taken into account")
    missing: list[str] | None = Field(
        None,
        description="the recipe's attacks at this budget that did not run here (see skipped); a gate on "
        "this entry then fails unless its selector names the attacks it covers",
    )


class RobustMap(Record):
    """Detection: per image the worst of the attacks run at one budget (the one leaving fewest
    of its objects found), and the COCO mAP of those images (``samples``: the images every one
    of them saw)."""

    omit_if_none = frozenset({"missing"})

    norm: str = Field(description="linf or l2")
    eps: float = Field(description="the budget")
    map: float = Field(description="COCO mAP@[.5:.95] of each image's worst attack")
    map50: float = Field(description="mAP@.5 of the same")
    samples: int = Field(description="images every attack at this budget saw")
    attacks: list[str] = Field(description="the attacks taken into the worst case")
    missing: list[str] | None = Field(
        None,
        description="the recipe's attacks at this budget that did not run here (see skipped); a gate on "
        "this entry then fails unless its selector names the attacks it covers",
    )


class Parity(Record):
    """An engine against the PyTorch model on the same clean images.

    ``max_abs_diff`` is null when either side returned NaN or Inf (``nonfinite`` images);
    such an image always counts as a disagreement. ``ties`` (segmentation): pixels counted as
    agreeing because their arg-max differs only at a near-tie the logit difference explains.
    Detection: ``top1_agreement`` is the share of detections matched across the two runtimes
    (same class, IoU >= 0.99, scores within 1e-3; ``ties``: unmatched ones that rounding at the
    score threshold or inside NMS explains), ``compared`` the detections compared, and
    ``map_delta`` the engine's mAP@[.5:.95] minus PyTorch's on the same images.
    """

    omit_if_none = frozenset({"ties", "map_delta"})
    reference: str = Field("torch", description="what the engine is compared with (torch)")
    max_abs_diff: float | None = Field(
        None, description="largest |logit difference| (null if either side returned NaN/Inf)"
    )
    top1_agreement: float = Field(
        0.0,
        description="share of images (segmentation: pixels) with the same arg-max; a NaN/Inf logit counts "
        "as a disagreement",
    )
    compared: int = Field(0, description="images (segmentation: pixels) compared")
    nonfinite: int = Field(0, description="images with a NaN/Inf logit on either side")
    ties: int | None = Field(
        None,
        description="segmentation: pixels whose arg-max flipped at a near-tie within 1e-3, counted as "
        "agreeing",
    )
    map_delta: float | None = Field(
        None, description="detection: the engine's mAP@[.5:.95] minus PyTorch's on the same images"
    )


class Corruptions(Record):
    """Accuracy per corruption and severity, their mean, and errors relative to dense.

    Segmentation adds ``per_corruption_miou`` and ``mean_miou`` (``per_corruption`` holds the
    pixel accuracy), and its ``mce``/``relative_mce``/``errors`` are computed on mIoU.
    Detection adds ``per_corruption_map`` (COCO mAP@[.5:.95] per corruption and severity),
    ``mpc`` (their mean: Michaelis et al. 2019's mean performance under corruption) and ``rpc``
    (``mpc`` / clean mAP); ``per_corruption`` holds the share of objects found, and
    ``mce``/``relative_mce`` are computed on mAP.
    """

    omit_if_none = frozenset(
        {
            "per_corruption",
            "mean_accuracy",
            "mce",
            "relative_mce",
            "relative_excluded",
            "relative_floored",
            "baseline",
            "errors",
            "per_corruption_miou",
            "mean_miou",
            "per_corruption_map",
            "mpc",
            "rpc",
        }
    )
    per_corruption: dict[str, dict[str, float]] | None = Field(
        None,
        description='accuracy per corruption and severity, e.g. {"fog": {"1": 0.62, "5": 0.31}} '
        "(segmentation: pixel accuracy)",
    )
    mean_accuracy: float | None = Field(None, description="mean over corruptions and severities")
    mce: float | None = Field(
        None,
        description="mean corruption error relative to the dense model on the same runtime (ImageNet-C: "
        "CE_c = sum_s E / sum_s E_dense); 1.0 for the dense model",
    )
    relative_mce: float | None = Field(
        None,
        description="mean relative CE: each model's degradation under a corruption (error above its clean "
        "error, never below 0) over the dense model's, the latter floored at 1 point per severity; "
        "in [0, 100]; null when no corruption degrades either model",
    )
    relative_excluded: list[str] | None = Field(
        None,
        description="corruptions left out of relative_mce: neither model degrades by 1 point per severity",
    )
    relative_floored: list[str] | None = Field(
        None,
        description="corruptions the dense model does not degrade on but this model does: counted in "
        "relative_mce against the floor (a loss here shows as a large relative CE)",
    )
    baseline: dict[str, str] | None = Field(
        None, description="the evaluation compared against: model, runtime, precision"
    )
    errors: dict[str, dict[str, float | None]] | None = Field(
        None, description="per corruption: ce and relative_ce"
    )
    per_corruption_miou: dict[str, dict[str, float]] | None = Field(
        None, description="segmentation: mIoU per corruption and severity"
    )
    mean_miou: float | None = Field(
        None, description="segmentation: mean mIoU over corruptions and severities"
    )
    per_corruption_map: dict[str, dict[str, float]] | None = Field(
        None, description="detection: COCO mAP@[.5:.95] per corruption and severity"
    )
    mpc: float | None = Field(
        None, description="detection: mean mAP over corruptions and severities (mPC, Michaelis et al. 2019)"
    )
    rpc: float | None = Field(None, description="detection: mPC / clean mAP (rPC)")


class Skipped(Record):
    """An attack that was not run, and why."""

    name: str = Field(description="the attack")
    reason: str = Field(description="why it was not run")


class Evaluation(Record):
    """One model on one runtime and precision: the whole robustness suite.

    ``nonfinite_logits`` counts the images (clean, attacked or corrupted) for which this
    runtime returned a NaN or Inf logit; null only in reports older than the count, where
    the intrinsic gate fails closed.

    Segmentation evaluations (``task: segmentation``) add ``miou``, ``pixel_accuracy``,
    ``per_class_iou`` (class name to IoU, null for a class neither labelled nor predicted) and
    ``robust_miou``; their ``clean_accuracy`` is the pixel accuracy, and ``parity`` compares
    per-pixel predictions (``top1_agreement`` over pixels, ``compared`` pixels).

    Detection evaluations (``task: detection``) add ``map`` (COCO mAP@[.5:.95]), ``map50``,
    ``map75``, ``per_class_ap`` and ``per_class_recall`` (class name to AP@[.5:.95] / AR@100,
    null for a class neither labelled nor detected) and ``robust_map``; their
    ``clean_accuracy`` is the share of objects found (a detection of their class with a score of
    at least 0.3 at IoU 0.5: the operating point), and ``parity`` compares detections.
    """

    omit_if_none = frozenset(
        {
            "skipped",
            "calibration",
            "scheme",
            "file",
            "engine",
            "tensorrt_version",
            "parity_fp32",
            "task",
            "miou",
            "pixel_accuracy",
            "per_class_iou",
            "robust_miou",
            "map",
            "map50",
            "map75",
            "per_class_ap",
            "per_class_recall",
            "robust_map",
        }
    )
    model: str = Field(description="dense or pruned")
    runtime: str = Field(description="torch, onnxruntime, tensorrt, onnxruntime-cuda or onnxruntime-tensorrt")
    precision: str = Field("fp32", description="fp32, fp16 or int8")
    calibration: str | None = Field(None, description="INT8 files: clean, mixed or qat")
    scheme: str | None = Field(None, description="INT8 files: the Q/DQ scheme (u8s8 or s8s8)")
    file: str | None = Field(None, description="INT8 files on ONNX Runtime: the Q/DQ file")
    engine: str | None = Field(None, description="TensorRT engines: the engine file")
    tensorrt_version: str | None = Field(None, description="TensorRT engines: the TensorRT that built it")
    device: str = Field("cpu", description="the device it ran on")
    samples: int = Field(0, description="images evaluated")
    clean_accuracy: float = Field(
        0.0, description="top-1 accuracy on clean images (segmentation: pixel accuracy over labelled pixels)"
    )
    corruptions: Corruptions = Field(
        default_factory=Corruptions, description="the corruption suite's results"
    )
    attacks: list[AttackRow] = Field(default_factory=list, description="one row per attack and mode")
    robust_accuracy: list[RobustAccuracy] = Field(
        default_factory=list,
        description="per budget (norm, eps): the per-image worst case over every attack run at it",
    )
    parity: Parity | None = Field(
        None, description="against the PyTorch model on the same clean images (null for a bare engine)"
    )
    nonfinite_logits: int | None = Field(
        None,
        description="images (clean, attacked or corrupted) for which this runtime returned a NaN or Inf "
        "logit; such an image is never correct",
    )
    flags: list[str] = Field(
        default_factory=list, description="sanity conditions raised (see Robustness: sanity flags)"
    )
    skipped: list[Skipped] | None = Field(
        None, description="attacks not run, and why (a bare engine has no white-box attacks)"
    )
    parity_fp32: dict[str, Any] | None = Field(
        None,
        description="INT8 files: agreement with their FP32 file per input kind (clean, adversarial, "
        "corrupted, all): samples, top1_agreement, label_flip_rate, max_abs_diff; segmentation "
        "adds pixels and ties; detection compares confident detections (same class, IoU >= 0.5): "
        "top1_agreement is the matched share of the compared detections of both files, with compared",
    )
    task: str | None = Field(
        None, description="segmentation or detection for those evaluations (absent for classification)"
    )
    miou: float | None = Field(
        None, description="segmentation: clean mean IoU over the classes present in labels or predictions"
    )
    pixel_accuracy: float | None = Field(
        None, description="segmentation: share of labelled pixels predicted right"
    )
    per_class_iou: dict[str, float | None] | None = Field(
        None,
        description="segmentation: clean IoU per class (null for a class neither labelled nor predicted)",
    )
    robust_miou: list[RobustMiou] | None = Field(
        None, description="segmentation: per budget, the lowest mIoU among the attacks"
    )
    map: float | None = Field(None, description="detection: clean COCO mAP@[.5:.95]")
    map50: float | None = Field(None, description="detection: clean mAP@.5")
    map75: float | None = Field(None, description="detection: clean mAP@.75")
    per_class_ap: dict[str, float | None] | None = Field(
        None, description="detection: clean AP@[.5:.95] per class (null: neither labelled nor detected)"
    )
    per_class_recall: dict[str, float | None] | None = Field(
        None, description="detection: clean COCO AR@100 per class"
    )
    robust_map: list[RobustMap] | None = Field(
        None, description="detection: per budget, the mAP of each image's worst attack"
    )

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        return (self.model, self.runtime, self.precision, self.calibration)


class LatencyRow(Record):
    """Latency percentiles of one model on one runtime at one batch size.

    Detection rows add the host post-processing (threshold, top-k, NMS) of that runtime's
    outputs on real images, ``postprocess_p50_ms``, and ``end_to_end_p50_ms`` (network p50 plus
    post-processing p50).
    """

    omit_if_none = frozenset(
        {"calibration", "scheme", "file", "engine", "postprocess_p50_ms", "end_to_end_p50_ms"}
    )
    model: str = Field(description="dense or pruned")
    runtime: str = Field(description="the runtime timed")
    precision: str = Field("fp32", description="fp32, fp16 or int8")
    device: str = Field("cpu", description="the device it ran on")
    batch: int = Field(description="batch size")
    threads: int | None = Field(
        None,
        description="CPU threads it really had (ONNX Runtime intra-op threads, torch's own for torch; null "
        "on a GPU)",
    )
    p50_ms: float = Field(description="median latency of one call, ms")
    p90_ms: float | None = Field(None, description="90th percentile, ms")
    p99_ms: float | None = Field(None, description="99th percentile, ms")
    mean_ms: float | None = Field(None, description="mean, ms")
    max_ms: float | None = Field(None, description="slowest call, ms")
    samples: int | None = Field(None, description="timed calls")
    throughput: float | None = Field(None, description="images per second at p50")
    provider: str | None = Field(
        None, description="ONNX Runtime's execution provider after session creation (what really ran)"
    )
    calibration: str | None = Field(None, description="INT8 files: clean, mixed or qat")
    scheme: str | None = Field(None, description="INT8 files: the Q/DQ scheme")
    file: str | None = Field(None, description="INT8 files: the Q/DQ file")
    engine: str | None = Field(None, description="TensorRT engines: the engine file")
    postprocess_p50_ms: float | None = Field(
        None, description="detection: host post-processing (threshold, top-k, NMS) on real images, ms"
    )
    end_to_end_p50_ms: float | None = Field(None, description="detection: p50_ms plus postprocess_p50_ms")


class QuantizedFile(Record):
    """One INT8 Q/DQ file: which model, for which runtime's scheme, calibrated how, and what ONNX
    Runtime fused of it (the ``quantize`` stage's record of it)."""

    omit_if_none = frozenset(
        {"methods_agreement", "holdout_agreement", "mixed_precision", "speed", "qat", "bias_shift"}
    )
    model: str = Field(description="dense or pruned")
    target: str = Field(description="the runtime the file is made for (onnxruntime or tensorrt)")
    scheme: str = Field(description="u8s8 (ONNX Runtime CPU) or s8s8 (TensorRT)")
    scheme_description: str = Field("", description="the scheme in words")
    calibration: str = Field(description="clean, mixed, or qat (quantisation-aware fine-tuning)")
    file: str = Field(description="the Q/DQ file, under quantize/")
    samples: int = Field(0, description="calibration images")
    counts: dict[str, int] = Field(
        default_factory=dict, description="calibration images per kind: clean, corrupted, adversarial"
    )
    method: str | None = Field(
        None, description="the calibrator (quantize.method), or qat for a quantisation-aware fine-tuned file"
    )
    per_channel: bool | None = Field(None, description="per-channel weight scales")
    bias_correction: bool = Field(
        False,
        description="quantize.bias_correction: each INT8 layer's mean output shift taken out of its bias",
    )
    bias_shift: dict[str, float] | None = Field(
        None,
        description="with bias correction, per corrected layer the mean |shift| over its output channels "
        "(quantised minus FP32 mean on the calibration images, in the output's units) taken out of its "
        "bias",
    )
    excluded_nodes: list[str] = Field(default_factory=list, description="nodes kept in float")
    quantized_nodes: dict[str, int] = Field(
        default_factory=dict, description="nodes given Q/DQ inputs, per op type"
    )
    fusion: dict[str, Any] = Field(
        default_factory=dict,
        description="what ONNX Runtime runs in integer kernels in its optimised graph: conv_nodes, "
        "integer_conv, float_conv, integer_matmul, all_integer",
    )
    methods_agreement: dict[str, dict[str, float | None]] | None = Field(
        None,
        description="quantize.method auto: each method tried, with its file's top-1 agreement with FP32 on "
        "the held-out training images (clean, adversarial)",
    )
    holdout_agreement: dict[str, float | None] | None = Field(
        None, description="this file's agreement with FP32 on the held-out images (clean, adversarial)"
    )
    mixed_precision: dict[str, Any] | None = Field(
        None,
        description="quantize.target_agreement: target, adversarial_target, fp32_nodes (the layers kept in "
        "FP32, most sensitive first: graph node names, or for calibration qat the model's layer names), "
        "met, all_int8 and final held-out agreement, sensitivity per layer; "
        "with method auto, methods_fp32_layers (how many FP32 layers each method searched needed to meet "
        "the target, null where it did not with fewer than the best)",
    )
    speed: dict[str, Any] | None = Field(
        None,
        description="onnxruntime target: the INT8 file against its FP32 file on ONNX Runtime's CPU at the "
        "bench batch sizes (batches: fp32_p50_ms, int8_p50_ms, speedup, and with FP32 layers "
        "all_int8_p50_ms and mixed_precision_cost), faster, why_not (fused convolutions, Q/DQ nodes left, "
        "MMACs per convolution)",
    )
    qat: dict[str, Any] | None = Field(
        None,
        description="quantize.qat files: epochs, loss, init (how activation scales started), learn_scales, "
        "history (per epoch: loss, accuracy under rounding, lr), layers (how many were quantised), "
        "rounded_outputs (modules whose output is rounded: residual additions and what they read), "
        "unmatched_nodes (graph nodes left in float that no layer accounts for), float_nodes (the nodes "
        "of the layers mixed precision kept in float)",
    )


class Quantization(QuantizedFile):
    """One INT8 file in report.json: how it was made, what ONNX Runtime fused, and how it compares
    with its FP32 file on the same runtime (``vs_fp32``)."""

    vs_fp32: dict[str, Any] = Field(
        default_factory=dict,
        description="against the FP32 file on the same runtime: clean_drop, attack_drop (PGD transfer), "
        "corruption_drop (fractions, FP32 minus INT8), top1_agreement, label_flip_rate and their "
        "_all_inputs variants, top1_agreement_adversarial (PGD-transfer images), segmentation also "
        "clean_miou_drop, attack_miou_drop, corruption_miou_drop; speedup per batch (FP32 p50 / INT8 p50), "
        "slowdown (the largest INT8 / FP32 p50), evaluated",
    )


class EngineBuild(Record):
    """One TensorRT engine: the model and calibration it is of, its file (``path``, in the engine
    folder), cache key, precision, TensorRT version, source file and whether this run built it."""

    model: str = Field(description="dense or pruned")
    calibration: str | None = Field(None, description="INT8 engines: the Q/DQ file's calibration")
    path: str = Field(description="the engine file, under engine/")
    key: str = Field(
        "", description="the build's cache key (ONNX sha256, TensorRT version, precision, profile)"
    )
    precision: str = Field(description="fp32, fp16 or int8")
    tensorrt_version: str = Field("", description="the TensorRT that built it")
    source: str = Field("", description="the ONNX file it was built from")
    built: bool = Field(False, description="false when an engine with the same key was reused")


class GateResult(Record):
    """A recipe or policy gate after evaluation; ``value`` is null when the metric is missing."""

    omit_if_none = frozenset({"error"})
    metric: str = Field(description="the dotted path the gate reads")
    op: str = Field(">=", description="the comparison")
    threshold: float = Field(description="the limit")
    relative: str | None = Field(
        None, description="delta or ratio against a baseline report, or null (absolute)"
    )
    value: float | None = Field(
        None, description="the value compared (null when the metric is missing: the gate fails)"
    )
    passed: bool = Field(description="the gate passed")
    error: str | None = Field(
        None, description="why the metric could not be read (missing, ambiguous, not a number)"
    )


class IntrinsicGate(Record):
    """A check every run must pass whatever its recipe says (see :mod:`toolchain.report.gates`)."""

    name: str = Field(description="budget-met, engine-parity, finite-logits or evaluated-and-gated")
    passed: bool = Field(description="the check passed")
    detail: str = Field(description="what was checked and found")


class EngineInfo(Record):
    """``robustprune validate``: which file, its metadata, and whether PyTorch was found."""

    path: str = Field(description="the ONNX file validated")
    metadata: dict[str, str] = Field(default_factory=dict, description="its ONNX metadata")
    pytorch_reference: bool = Field(
        False, description="its PyTorch model was found (white-box and transfer attacks ran)"
    )


class Report(Record):
    """report.json: everything a run (or ``robustprune validate``) found, and its verdict.

    ``status`` is ``completed`` for a report written at the end of a run, ``stale`` after a
    later run started (and crashed before writing its own); null in reports written before
    the key existed. ``passed`` is true only if every recipe gate and every intrinsic gate
    passed.
    """

    omit_if_none = frozenset(
        {"arch", "criterion", "engine", "parity", "stage_seconds", "quantization", "engines"}
    )
    schema_: str = Field(SCHEMA, alias="schema", description="schema name and version: robustprune.report/1")
    status: Literal["completed", "stale"] | None = Field(
        None,
        description="completed (written at the end of a run that finished every stage) or stale (a later "
        "run started and has not completed); gate refuses anything else",
    )
    recipe_sha256: str = Field("", description="sha256 of the validated recipe (gate --recipe checks it)")
    name: str | None = Field(None, description="the run's name")
    dataset: str | None = Field(None, description="the dataset")
    arch: str | None = Field(None, description="the architecture")
    criterion: str | None = Field(None, description="prune.criterion")
    engine: EngineInfo | None = Field(None, description="robustprune validate only: the file validated")
    environment: Environment = Field(
        default_factory=Environment, description="versions and devices the numbers were measured on"
    )
    models: Models = Field(
        default_factory=Models, description="sizes of the dense and pruned models and the pruning result"
    )
    parity: dict[str, ExportParity] | None = Field(
        None, description="the export stage's check of each ONNX file against PyTorch, per model"
    )
    evaluations: list[Evaluation] = Field(
        default_factory=list, description="one per model x runtime x precision (x calibration for INT8 files)"
    )
    latency: list[LatencyRow] = Field(
        default_factory=list, description="one per model x runtime x precision x batch"
    )
    stage_seconds: dict[str, float | None] | None = Field(
        None, description="wall time per stage, as recorded when it ran"
    )
    gates: list[GateResult] = Field(default_factory=list, description="the recipe's (or policy's) gates")
    intrinsic_gates: list[IntrinsicGate] = Field(
        default_factory=list, description="checks every run must pass whatever its recipe says"
    )
    passed: bool = Field(False, description="every recipe gate and every intrinsic gate passed")
    quantization: list[Quantization] | None = Field(None, description="one per INT8 file (runs only)")
    engines: list[EngineBuild] | None = Field(
        None, description="the engine stage's TensorRT engines (runs only)"
    )

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_report(data: Any, where: str = "report") -> Report:
    """Validate a report.json's content.

    Raises:
        UserError: not a robustprune report (no ``schema`` key) or a key of the wrong type.
    """
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("robustprune.report/"):
        raise UserError(f"{where} is not a robustprune report.json (no 'schema' key)")
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{where}: {loc}: {err['msg']}") from None


def read_report(path: str | Path, what: str = "report") -> Report:
    """Load and validate a report.json.

    Raises:
        UserError: the file is missing, not JSON, or not a robustprune report.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {str(p)!r} is not valid JSON: {exc}") from None
    return parse_report(data, f"{what} {str(p)!r}")
