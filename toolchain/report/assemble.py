"""Assemble report.json (a typed :class:`~toolchain.report.schema.Report`) from a run directory."""

from __future__ import annotations

import importlib.metadata
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.models import trusted_builder
from toolchain.recipe import Recipe
from toolchain.report.gates import evaluate_gates, intrinsic_gates, verdict
from toolchain.report.quantization import engines_section, quantization_gates, quantization_section
from toolchain.report.schema import (
    COMPLETED,
    DenseModel,
    Environment,
    Evaluation,
    ExportParity,
    LatencyRow,
    Models,
    PrunedModel,
    Report,
)
from toolchain.robustness.corruptions.metrics import summarize
from toolchain.rundir import read_json
from toolchain.tasks import task_named

log = logging.getLogger(__name__)

STAGES = ("train", "prune", "finetune", "export", "quantize", "engine", "validate", "bench")


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
        robustprune=_version("robustprune"),
        device=", ".join(devices),
        devices=devices,
        threads=threads,
    )


def _stage_result(root: Path, stage: str) -> dict[str, Any]:
    path = root / stage / "stage.json"
    return read_json(path)["result"] if path.is_file() else {}


def target_met(target: dict[str, float] | None, tolerance: float, achieved: dict[str, float]) -> bool | None:
    """Whether every reduction in ``target`` was achieved within ``tolerance``.

    A reduction factor counts as met when ``achieved >= target * (1 - tolerance)``: more
    reduction than asked is still within budget. ``None`` without a target, or when a
    target's metric was not measured (the intrinsic gate then fails closed).
    """
    if not target or any(k not in achieved for k in target):
        return None
    return all(achieved[k] >= v * (1 - tolerance) for k, v in target.items())


def models_section(
    root: Path,
    tolerance: float,
    example_inputs: torch.Tensor | None = None,
    build: Callable[[Mapping[str, Any]], nn.Module] | None = None,
) -> Models:
    """report.json's ``models``: sizes, reductions and the budget check from a run directory.

    Args:
        root: the run directory (its train, prune and finetune stage records).
        tolerance: the recipe's relative tolerance on the pruning target.
        example_inputs: an input batch to rebuild the saved models and count their output
            channels per layer (``None``: no per-layer channels).
        build: rebuilds a dense model from a saved spec (needed with ``example_inputs``).
    """
    prune = _stage_result(root, "prune")
    dense = _stage_result(root, "train")
    final = _stage_result(root, "finetune")
    macs, params = final.get("macs", 0), final.get("params", 0)
    dense_macs, dense_params = dense.get("macs", 0), dense.get("params", 0)
    reductions = {
        "macs_reduction": dense_macs / macs if macs else 0.0,
        "params_reduction": dense_params / params if params else 0.0,
    }
    channels: dict[str, dict[str, int]] = {}
    if example_inputs is not None and build is not None:
        from toolchain.report.channels import layer_channels

        channels = layer_channels(root, example_inputs, build)
    target = prune.get("target")
    latency = prune.get("latency")
    if latency is not None:  # measured on the pruned model; fine-tuning keeps its shape
        reductions["latency_reduction"] = latency["measured_reduction"]
    return Models(
        dense=DenseModel(macs=dense_macs, params=dense_params, channels=channels.get("dense")),
        pruned=PrunedModel(
            method=prune.get("method", "iterative"),
            macs=macs,
            params=params,
            macs_reduction=reductions["macs_reduction"],
            params_reduction=reductions["params_reduction"],
            latency=latency,
            target=target,
            tolerance=tolerance,
            target_met=target_met(target, tolerance, reductions),
            steps=prune.get("steps", []),
            info=prune.get("info"),
            channels=channels.get("pruned"),
        ),
    )


def add_corruption_errors(evaluations: list[Evaluation]) -> None:
    """Fill each evaluation's corruption errors relative to the dense model on the same runtime.

    The errors are computed on the score the evaluation's task names (accuracy for
    classification, mIoU for segmentation; :meth:`toolchain.tasks.Task.corruption_scores`).
    """
    dense = {(e.runtime, e.precision): e for e in evaluations if e.model == "dense"}
    for ev in evaluations:
        task = task_named(ev.task)
        per, clean = task.corruption_scores(ev)
        if not per:
            continue
        base = dense.get((ev.runtime, ev.precision)) or dense.get(("torch", "fp32"))
        base_per, base_clean = task.corruption_scores(base) if base is not None else (None, 0.0)
        if base is None or not base_per:
            continue
        summary = summarize(per, base_per, clean, base_clean)  # type: ignore[arg-type]  # str severities
        ev.corruptions.mce = _finite(summary["mce"])
        ev.corruptions.relative_mce = _finite(summary["relative_mce"])
        ev.corruptions.relative_excluded = sorted(summary["relative_excluded"])  # type: ignore[call-overload]
        ev.corruptions.baseline = {"model": base.model, "runtime": base.runtime, "precision": base.precision}
        ev.corruptions.errors = {
            name: {k: _finite(v) for k, v in row.items() if k in ("ce", "relative_ce")}
            for name, row in summary["per_corruption"].items()  # type: ignore[attr-defined]
        }


def _finite(value: Any) -> float | None:
    """report.json is strict JSON: an infinite or undefined ratio is written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def finish(report: Report, gates: Any) -> Report:
    """Evaluate the recipe's gates and the intrinsic ones; set ``passed`` and the ``completed`` status."""
    report.gates = evaluate_gates(report, gates)
    report.intrinsic_gates = intrinsic_gates(report)
    report.passed = verdict(report.gates, report.intrinsic_gates)
    report.status = COMPLETED
    return report


def assemble_report(
    root: Path, recipe: Recipe, data_name: str, example_inputs: torch.Tensor | None = None
) -> Report:
    """Build the report of a run whose every stage finished.

    Args:
        root: the run directory.
        recipe: the run's recipe (its gates, tolerance and hash).
        data_name: the dataset's name.
        example_inputs: an input batch, to count each saved model's channels per layer.
    """
    evaluations = [Evaluation.model_validate(e) for e in read_json(root / "validate" / "evaluations.json")]
    add_corruption_errors(evaluations)
    latency_path = root / "bench" / "latency.json"
    latency = (
        [LatencyRow.model_validate(r) for r in read_json(latency_path)] if latency_path.is_file() else []
    )
    parity = _stage_result(root, "export").get("parity", {})
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
        models=models_section(root, recipe.prune.tolerance, example_inputs, trusted_builder(recipe)),
        parity={name: ExportParity.model_validate(p) for name, p in parity.items()},
        evaluations=evaluations,
        latency=latency,
        quantization=quantization_section(root, as_json, latency_json),
        engines=engines_section(root),
        stage_seconds={
            stage: read_json(root / stage / "stage.json").get("seconds")
            for stage in STAGES
            if (root / stage / "stage.json").is_file()
        },
    )
    return finish(report, [*recipe.gates, *quantization_gates(recipe)])
