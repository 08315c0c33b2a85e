"""What each stage records in its ``stage.json`` (its ``result``), typed.

Stages build these, the pipeline writes them, and everything that reads a finished run
(the report, ``robustprune validate``, trials, benchmarks) reads them back through
:func:`read_result` instead of picking keys out of loose dicts. They are report records
(:class:`~toolchain.report.schema.Record`): extra keys are kept, so a result written by a newer
robustprune still loads, and the JSON keys are the ones stage records have always had.
Light to import (pydantic only).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import Field, ValidationError

from toolchain.report.schema import EngineBuild, ExportParity, QuantizedFile, Record
from toolchain.rundir import (
    BENCH,
    ENGINE,
    EXPORT,
    FINETUNE,
    PRUNE,
    QUANTIZE,
    TRAIN,
    VALIDATE,
    RunLayout,
)

__all__ = [
    "BenchResult",
    "EngineBuild",
    "EngineResult",
    "ExportResult",
    "ModelResult",
    "PruneResult",
    "QuantizeResult",
    "QuantizedFile",
    "StageResult",
    "ValidateResult",
    "read_result",
]


class StageResult(Record):
    """Base of every stage's result."""


class ModelResult(StageResult):
    """A stage that saves a trained model (``train``, ``finetune``).

    Attributes:
        epochs: one record per training epoch (loss, accuracy, lr, ...; see
            :func:`toolchain.training.train_model`).
        macs, params: the saved model's size (MACs for one image).
        channels: output channels per layer of the saved model.
    """

    omit_if_none = frozenset({"channels"})
    epochs: list[dict[str, Any]] = Field(default_factory=list)
    macs: int = 0
    params: int = 0
    channels: dict[str, int] | None = None


class PruneResult(StageResult):
    """The ``prune`` stage: the method, the budget and what it achieved.

    ``target`` is ``{"<metric>_reduction": factor}``; ``target_met`` applies
    :func:`toolchain.recipe_prune.reduction_met`; ``latency`` is the measured record of a latency
    target (see :class:`~toolchain.report.schema.PrunedModel`); ``trace`` holds bulky per-batch
    records kept only here; ``structure`` the low-rank factorisation records.
    """

    omit_if_none = frozenset({"latency"})
    method: str = "iterative"
    target: dict[str, float] | None = None
    tolerance: float | None = None
    target_met: bool | None = None
    dense_macs: int = 0
    dense_params: int = 0
    macs: int = 0
    params: int = 0
    macs_reduction: float = 0.0
    params_reduction: float = 0.0
    steps: list[dict[str, Any]] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)
    trace: dict[str, Any] = Field(default_factory=dict)
    structure: list[dict[str, Any]] = Field(default_factory=list)
    latency: dict[str, Any] | None = None


class ExportResult(StageResult):
    """The ``export`` stage: each ONNX file's parity against its PyTorch model."""

    parity: dict[str, ExportParity] = Field(default_factory=dict)


class QuantizeResult(StageResult):
    """The ``quantize`` stage: its files (none when ``quantize.enabled`` is off)."""

    files: list[QuantizedFile] = Field(default_factory=list)


class EngineResult(StageResult):
    """The ``engine`` stage: its engines (none when no runtime list names ``tensorrt``)."""

    engines: list[EngineBuild] = Field(default_factory=list)


class ValidateResult(StageResult):
    """The ``validate`` stage: how many evaluations it wrote (they are in its evaluations file)."""

    count: int = 0


class BenchResult(StageResult):
    """The ``bench`` stage: how many latency rows it wrote (they are in its latency file)."""

    rows: int = 0


#: The result type of each stage.
RESULT_TYPES: dict[str, type[StageResult]] = {
    TRAIN: ModelResult,
    PRUNE: PruneResult,
    FINETUNE: ModelResult,
    EXPORT: ExportResult,
    QUANTIZE: QuantizeResult,
    ENGINE: EngineResult,
    VALIDATE: ValidateResult,
    BENCH: BenchResult,
}

R = TypeVar("R", bound=StageResult)


def read_result(layout: RunLayout, stage: str, kind: type[R]) -> R | None:
    """The recorded result of ``stage`` in a run directory, or None when the stage has no
    record (it never finished) or its record does not parse as ``kind``."""
    data = layout.result(stage)
    if data is None:
        return None
    try:
        return kind.model_validate(data)
    except ValidationError:
        return None
