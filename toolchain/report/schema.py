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

    torch: str | None = None
    torch_pruning: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    tensorrt: str | None = None
    robustprune: str | None = None
    device: str = "cpu"
    threads: int | None = None


class DenseModel(Record):
    """The dense model's size (MACs for one image) and its output channels per layer."""

    omit_if_none = frozenset({"channels"})
    macs: int = 0
    params: int = 0
    channels: dict[str, int] | None = None


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
    method: str | None = None
    macs_reduction: float = 0.0
    params_reduction: float = 0.0
    target: dict[str, float] | None = None
    tolerance: float | None = None
    target_met: bool | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)
    info: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None


class Models(Record):
    """``models``: empty for a bare engine validated on its own."""

    omit_if_none = frozenset({"dense", "pruned"})
    dense: DenseModel | None = None
    pruned: PrunedModel | None = None


class Float64Parity(Record):
    """Only when ``max_abs_diff`` exceeds ``export.parity_atol``: the largest logit difference of
    float32 PyTorch and of ONNX Runtime from the same model run in float64, and how often each
    picks float64's class (an engine about as far from float64 as PyTorch is differs by float32
    rounding, not by a wrong export)."""

    torch_fp32_max_abs_diff: float
    engine_max_abs_diff: float
    torch_fp32_top1_agreement: float | None = None
    engine_top1_agreement: float | None = None


class ExportParity(Record):
    """The export stage's parity check of an ONNX file against its PyTorch model.

    ``max_abs_diff`` / ``mean_abs_diff`` are null when the engine returned NaN or Inf.
    ``reference_max_abs`` is the largest PyTorch logit, the scale of the differences (absent in
    reports written before it was recorded; null when PyTorch returned NaN or Inf). ``float64``:
    see :class:`Float64Parity`.
    """

    omit_if_none = frozenset({"reference_max_abs", "float64"})
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float = 0.0
    samples: int = 0
    reference_max_abs: float | None = None
    within_atol: bool = False
    float64: Float64Parity | None = None


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
    name: str
    mode: Literal["white-box", "transfer", "black-box"]
    norm: str
    eps: float
    steps: int = 0
    queries: float = 0.0
    samples: int = 0
    accuracy: float
    ensemble: str | None = None
    miou: float | None = None
    clean_miou: float | None = None
    map: float | None = None
    map50: float | None = None
    clean_map: float | None = None
    vanishing_rate: float | None = None


class RobustAccuracy(Record):
    """Per-image worst case over every attack run at one budget (the field's robust accuracy).

    An image counts only if it is classified correctly clean and survives every attack in
    ``attacks``, on the images all of them saw (``samples``: with sample caps, the first
    ``min(cap)`` images of the stream).
    """

    norm: str
    eps: float
    accuracy: float
    samples: int
    attacks: list[str]


class RobustMiou(Record):
    """Segmentation: the lowest mIoU among the attacks run at one budget (``samples``: the
    fewest images any of them saw)."""

    norm: str
    eps: float
    miou: float
    samples: int
    attacks: list[str]


class RobustMap(Record):
    """Detection: per image the worst of the attacks run at one budget (the one leaving fewest
    of its objects found), and the COCO mAP of those images (``samples``: the images every one
    of them saw)."""

    norm: str
    eps: float
    map: float
    map50: float
    samples: int
    attacks: list[str]


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
    reference: str = "torch"
    max_abs_diff: float | None = None
    top1_agreement: float = 0.0
    compared: int = 0
    nonfinite: int = 0
    ties: int | None = None
    map_delta: float | None = None


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
            "baseline",
            "errors",
            "per_corruption_miou",
            "mean_miou",
            "per_corruption_map",
            "mpc",
            "rpc",
        }
    )
    per_corruption: dict[str, dict[str, float]] | None = None
    mean_accuracy: float | None = None
    mce: float | None = None
    relative_mce: float | None = None
    relative_excluded: list[str] | None = None
    baseline: dict[str, str] | None = None
    errors: dict[str, dict[str, float | None]] | None = None
    per_corruption_miou: dict[str, dict[str, float]] | None = None
    mean_miou: float | None = None
    per_corruption_map: dict[str, dict[str, float]] | None = None
    mpc: float | None = None
    rpc: float | None = None


class Skipped(Record):
    """An attack that was not run, and why."""

    name: str
    reason: str


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
    model: str
    runtime: str
    precision: str = "fp32"
    calibration: str | None = None
    device: str = "cpu"
    samples: int = 0
    clean_accuracy: float = 0.0
    corruptions: Corruptions = Field(default_factory=Corruptions)
    attacks: list[AttackRow] = Field(default_factory=list)
    robust_accuracy: list[RobustAccuracy] = Field(default_factory=list)
    parity: Parity | None = None
    nonfinite_logits: int | None = None
    flags: list[str] = Field(default_factory=list)
    skipped: list[Skipped] | None = None
    parity_fp32: dict[str, Any] | None = None
    task: str | None = None
    miou: float | None = None
    pixel_accuracy: float | None = None
    per_class_iou: dict[str, float | None] | None = None
    robust_miou: list[RobustMiou] | None = None
    map: float | None = None
    map50: float | None = None
    map75: float | None = None
    per_class_ap: dict[str, float | None] | None = None
    per_class_recall: dict[str, float | None] | None = None
    robust_map: list[RobustMap] | None = None

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        return (self.model, self.runtime, self.precision, self.calibration)


class LatencyRow(Record):
    """Latency percentiles of one model on one runtime at one batch size.

    Detection rows add the host post-processing (threshold, top-k, NMS) of that runtime's
    outputs on real images, ``postprocess_p50_ms``, and ``end_to_end_p50_ms`` (network p50 plus
    post-processing p50).
    """

    omit_if_none = frozenset({"postprocess_p50_ms", "end_to_end_p50_ms"})

    model: str
    runtime: str
    precision: str = "fp32"
    device: str = "cpu"
    batch: int
    threads: int | None = None
    p50_ms: float
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput: float | None = None
    postprocess_p50_ms: float | None = None
    end_to_end_p50_ms: float | None = None


class GateResult(Record):
    """A recipe or policy gate after evaluation; ``value`` is null when the metric is missing."""

    omit_if_none = frozenset({"error"})
    metric: str
    op: str = ">="
    threshold: float
    relative: str | None = None
    value: float | None = None
    passed: bool
    error: str | None = None


class IntrinsicGate(Record):
    """A check every run must pass whatever its recipe says (see :mod:`toolchain.report.gates`)."""

    name: str
    passed: bool
    detail: str


class EngineInfo(Record):
    """``robustprune validate``: which file, its metadata, and whether PyTorch was found."""

    path: str
    metadata: dict[str, str] = Field(default_factory=dict)
    pytorch_reference: bool = False


class Report(Record):
    """report.json.

    ``status`` is ``completed`` for a report written at the end of a run, ``stale`` after a
    later run started (and crashed before writing its own); null in reports written before
    the key existed. ``passed`` is true only if every recipe gate and every intrinsic gate
    passed.
    """

    omit_if_none = frozenset({"arch", "criterion", "engine", "parity", "stage_seconds"})
    schema_: str = Field(SCHEMA, alias="schema")
    status: Literal["completed", "stale"] | None = None
    recipe_sha256: str = ""
    name: str | None = None
    dataset: str | None = None
    arch: str | None = None
    criterion: str | None = None
    engine: EngineInfo | None = None
    environment: Environment = Field(default_factory=Environment)
    models: Models = Field(default_factory=Models)
    parity: dict[str, ExportParity] | None = None
    evaluations: list[Evaluation] = Field(default_factory=list)
    latency: list[LatencyRow] = Field(default_factory=list)
    stage_seconds: dict[str, float | None] | None = None
    gates: list[GateResult] = Field(default_factory=list)
    intrinsic_gates: list[IntrinsicGate] = Field(default_factory=list)
    passed: bool = False

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
