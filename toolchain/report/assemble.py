"""Assemble report.json (a typed :class:`~toolchain.report.schema.Report`) from a run directory.

Reads the stages' typed results (:mod:`toolchain.report.stage_results`) and files through the
run directory's layout; imports nothing above the report (no models, no suites).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from typing import Any

import torch

from toolchain.recipe import Recipe
from toolchain.recipe_prune import reduction_met
from toolchain.report.gates import evaluate_gates, verdict, verdict_gates
from toolchain.report.quantization import engines_section, quantization_gates, quantization_section
from toolchain.report.schema import (
    COMPLETED,
    DenseModel,
    Environment,
    Evaluation,
    LatencyRow,
    Models,
    PrunedModel,
    Report,
)
from toolchain.report.stage_results import ExportResult, ModelResult, PruneResult, read_result
from toolchain.rundir import (
    DENSE,
    EXPORT,
    MODEL_STAGES,
    PRUNE,
    PRUNED,
    STAGE_NAMES,
    RunLayout,
    read_json,
)

log = logging.getLogger(__name__)


def _version(package: str) -> str | None:
    # Reading installed metadata never imports the package (TensorRT would initialise CUDA).
    for name in (package, package.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(threads: int, devices_used: Iterable[str] = ()) -> Environment:
    """Versions, and the devices the numbers were measured on.

    Args:
        threads: the recipe's CPU thread count.
        devices_used: the ``device`` of every evaluation and latency row (``"cpu"``,
            ``"cuda:0"``, ...); ``device`` joins them (``"cpu"`` when there are none).
    """
    devices = sorted({d for d in devices_used if d}) or ["cpu"]
    return Environment(
        torch=torch.__version__,
        torch_pruning=_version("torch-pruning"),
        onnx=_version("onnx"),
        onnxruntime=_version("onnxruntime"),
        tensorrt=_version("tensorrt"),
        nncf=_version("nncf"),
        robustprune=_version("robustprune"),
        device=", ".join(devices),
        devices=devices,
        threads=threads,
    )


def target_met(target: dict[str, float] | None, tolerance: float, achieved: dict[str, float]) -> bool | None:
    """Whether every reduction in ``target`` was achieved within ``tolerance``
    (:func:`toolchain.recipe_prune.reduction_met`).

    ``None`` without a target, or when a target's metric was not measured (the intrinsic gate
    then fails closed).
    """
    if not target or any(k not in achieved for k in target):
        return None
    return all(reduction_met(achieved[k], v, tolerance) for k, v in target.items())


def models_section(layout: RunLayout, tolerance: float) -> Models:
    """report.json's ``models``: sizes, reductions, per-layer channels and the budget check.

    Args:
        layout: the run directory (its train, prune and finetune stage records).
        tolerance: the recipe's relative tolerance on the pruning target.
    """
    dense = read_result(layout, MODEL_STAGES[DENSE], ModelResult) or ModelResult()
    final = read_result(layout, MODEL_STAGES[PRUNED], ModelResult) or ModelResult()
    prune = read_result(layout, PRUNE, PruneResult) or PruneResult()
    reductions = {
        "macs_reduction": dense.macs / final.macs if final.macs else 0.0,
        "params_reduction": dense.params / final.params if final.params else 0.0,
    }
    if prune.latency is not None:  # measured on the pruned model; fine-tuning keeps its shape
        reductions["latency_reduction"] = prune.latency["measured_reduction"]
    return Models(
        dense=DenseModel(macs=dense.macs, params=dense.params, channels=dense.channels),
        pruned=PrunedModel(
            method=prune.method,
            macs=final.macs,
            params=final.params,
            macs_reduction=reductions["macs_reduction"],
            params_reduction=reductions["params_reduction"],
            latency=prune.latency,
            target=prune.target,
            tolerance=tolerance,
            target_met=target_met(prune.target, tolerance, reductions),
            steps=prune.steps,
            info=prune.info,
            channels=final.channels,
        ),
    )


def finish(report: Report, gates: Any, *, allow_unverified: bool = False) -> Report:
    """Evaluate the recipe's gates and the intrinsic ones; set ``passed`` and the ``completed`` status.

    Args:
        report: the report, its numbers filled in.
        gates: the recipe's gates.
        allow_unverified: the recipe's ``allow_unverified``: pass with no gate or no evaluation.
    """
    report.gates = evaluate_gates(report, gates)
    report.intrinsic_gates = verdict_gates(report, report.gates, allow_unverified=allow_unverified)
    report.passed = verdict(report.gates, report.intrinsic_gates)
    report.status = COMPLETED
    return report


def assemble_report(layout: RunLayout, recipe: Recipe, data_name: str) -> Report:
    """Build the report of a run whose every stage finished.

    Args:
        layout: the run directory.
        recipe: the run's recipe (its gates, tolerance and hash).
        data_name: the dataset's name.
    """
    evaluations = [Evaluation.model_validate(e) for e in read_json(layout.evaluations)]
    latency = []
    if layout.latency.is_file():
        latency = [LatencyRow.model_validate(r) for r in read_json(layout.latency)]
    export = read_result(layout, EXPORT, ExportResult) or ExportResult()
    as_json = [e.to_json() for e in evaluations]
    latency_json = [r.to_json() for r in latency]
    report = Report(
        recipe_sha256=recipe.sha256(),
        name=recipe.name,
        dataset=data_name,
        arch=recipe.model.arch,
        criterion=recipe.prune.criterion,
        environment=environment(
            recipe.validate.threads, [str(r.get("device", "")) for r in [*as_json, *latency_json]]
        ),
        models=models_section(layout, recipe.prune.tolerance),
        parity=export.parity,
        evaluations=evaluations,
        latency=latency,
        quantization=quantization_section(layout, as_json, latency_json),
        engines=engines_section(layout),
        stage_seconds=_stage_seconds(layout),
    )
    gates = [*recipe.gates, *quantization_gates(recipe)]
    return finish(report, gates, allow_unverified=recipe.allow_unverified)


def _stage_seconds(layout: RunLayout) -> dict[str, float | None]:
    seconds = {}
    for stage in STAGE_NAMES:
        record = layout.record(stage)
        if record is not None:
            seconds[stage] = record.get("seconds")
    return seconds
