"""Assemble report.json from the run directory's stage records and write the human report."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from toolchain.recipe import Recipe
from toolchain.report import SCHEMA
from toolchain.report.gates import evaluate_gates
from toolchain.report.quantization import engines_section, quantization_gates, quantization_section
from toolchain.robustness.corruptions.metrics import summarize
from toolchain.rundir import atomic_path, read_json, write_json

log = logging.getLogger(__name__)


def _version(package: str) -> str | None:
    # Reading installed metadata never imports the package (TensorRT would initialise CUDA).
    for name in (package, package.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(threads: int, rows: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """Versions, and the devices the numbers were measured on.

    Args:
        threads: the recipe's CPU thread count.
        rows: evaluations and latency rows; ``device`` lists the devices they really ran on
            (``"cpu"``, ``"cuda:0"``, ...; ``"cpu"`` when there are none).
    """
    devices = sorted({str(r["device"]) for r in rows if r.get("device")}) or ["cpu"]
    return {
        "torch": torch.__version__,
        "torch_pruning": _version("torch-pruning"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "robustprune": _version("robustprune"),
        "device": ", ".join(devices),
        "devices": devices,
        "threads": threads,
    }


def _stage_result(root: Path, stage: str) -> dict[str, Any]:
    path = root / stage / "stage.json"
    return read_json(path)["result"] if path.is_file() else {}


def models_section(root: Path) -> dict[str, Any]:
    """report.json's ``models``: dense and pruned sizes from a run directory's stage records."""
    prune = _stage_result(root, "prune")
    dense = _stage_result(root, "train")
    final = _stage_result(root, "finetune")
    macs, params = final.get("macs", 0), final.get("params", 0)
    dense_macs, dense_params = dense.get("macs", 0), dense.get("params", 0)
    return {
        "dense": {"macs": dense_macs, "params": dense_params},
        "pruned": {
            "method": prune.get("method", "iterative"),
            "macs": macs,
            "params": params,
            "macs_reduction": dense_macs / macs if macs else 0.0,
            "params_reduction": dense_params / params if params else 0.0,
            "target": prune.get("target"),
            "steps": prune.get("steps", []),
        },
    }


def add_corruption_errors(evaluations: list[dict[str, Any]]) -> None:
    """Fill each evaluation's corruption errors relative to the dense model on the same runtime."""
    dense = {(e["runtime"], e["precision"]): e for e in evaluations if e["model"] == "dense"}
    for ev in evaluations:
        if not ev.get("corruptions", {}).get("per_corruption"):
            continue
        base = dense.get((ev["runtime"], ev["precision"])) or dense.get(("torch", "fp32"))
        if base is None or not base.get("corruptions", {}).get("per_corruption"):
            continue
        summary = summarize(
            ev["corruptions"]["per_corruption"],
            base["corruptions"]["per_corruption"],
            ev["clean_accuracy"],
            base["clean_accuracy"],
        )
        ev["corruptions"].update(
            mce=_finite(summary["mce"]),
            relative_mce=_finite(summary["relative_mce"]),
            relative_excluded=summary["relative_excluded"],
            baseline={"model": base["model"], "runtime": base["runtime"], "precision": base["precision"]},
            errors={
                name: {k: _finite(v) for k, v in row.items() if k in ("ce", "relative_ce")}
                for name, row in summary["per_corruption"].items()  # type: ignore[attr-defined]
            },
        )


def _finite(value: Any) -> float | None:
    """report.json is strict JSON: an infinite or undefined ratio is written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def assemble_report(root: Path, recipe: Recipe, data_name: str) -> dict[str, Any]:
    """Build the report dict (schema ``robustprune.report/1``) from a finished run directory."""
    evaluations = read_json(root / "validate" / "evaluations.json")
    add_corruption_errors(evaluations)
    latency_path = root / "bench" / "latency.json"
    latency = read_json(latency_path) if latency_path.is_file() else []
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "recipe_sha256": recipe.sha256(),
        "name": recipe.name,
        "dataset": data_name,
        "arch": recipe.model.arch,
        "criterion": recipe.prune.criterion,
        "environment": environment(recipe.validate.threads, [*evaluations, *latency]),
        "models": models_section(root),
        "parity": _stage_result(root, "export").get("parity", {}),
        "evaluations": evaluations,
        "latency": latency,
        "quantization": quantization_section(root, evaluations, latency),
        "engines": engines_section(root),
        "stage_seconds": {
            stage: read_json(root / stage / "stage.json").get("seconds")
            for stage in ("train", "prune", "finetune", "export", "quantize", "engine", "validate", "bench")
            if (root / stage / "stage.json").is_file()
        },
    }
    report["gates"] = evaluate_gates(report, [*recipe.gates, *quantization_gates(recipe)])
    report["passed"] = all(g["passed"] for g in report["gates"])
    return report


def write_report(root: Path, report: dict[str, Any]) -> None:
    """Write report.json, report.md and the plots into the run directory."""
    from toolchain.report.markdown import render_markdown
    from toolchain.report.plots import write_plots

    write_json(root / "report.json", report)
    try:
        plots = write_plots(report, root / "plots")
    except Exception as exc:  # a plot must never lose the report itself
        log.warning("plots not written: %s", exc)
        plots = []
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(render_markdown(report, [p.relative_to(root) for p in plots]))


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json (for the gate command and baselines)."""
    return json.loads(Path(path).read_text())
