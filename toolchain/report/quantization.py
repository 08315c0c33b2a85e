"""report.json's ``quantization`` and ``engines`` sections, and the gates the INT8 gate option adds.

Each INT8 file is set against the FP32 file it came from, on the same runtime: accuracy drops
(clean, white-box-transfer attack, mean corruption), agreement, and the latency ratio at each
benchmarked batch size, so one gate can refuse an INT8 model that is slower or less robust.
"""

from __future__ import annotations

from typing import Any

from toolchain.recipe import Gate, Recipe
from toolchain.report.stage_results import EngineResult, QuantizeResult, read_result
from toolchain.rundir import ENGINE, QUANTIZE, RunLayout

__all__ = ["engines_section", "quantization_gates", "quantization_section"]

_WHITE_BOX = ("pgd", "apgd", "fgsm", "segpgd")
_RUNTIME_OF_TARGET = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if len(found) == 1 else None


def _attack_accuracy(evaluation: dict[str, Any], key: str = "accuracy") -> float | None:
    """The first white-box attack's accuracy (or ``key``, e.g. ``miou``; transfer mode on an
    engine), PGD preferred."""
    rows = [a for a in evaluation.get("attacks", []) if a["name"] in _WHITE_BOX]
    rows.sort(key=lambda a: a["name"] != "pgd")
    return rows[0].get(key) if rows else None


def _miou_drops(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, float | None]:
    """Segmentation rows (those with an mIoU) add the same three drops on mIoU."""
    if fp32.get("miou") is None or int8.get("miou") is None:
        return {}
    return {
        "clean_miou_drop": _drop(fp32["miou"], int8["miou"]),
        "attack_miou_drop": _drop(_attack_accuracy(fp32, "miou"), _attack_accuracy(int8, "miou")),
        "corruption_miou_drop": _drop(
            fp32.get("corruptions", {}).get("mean_miou"), int8.get("corruptions", {}).get("mean_miou")
        ),
    }


def _drop(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else before - after


def quantization_section(
    layout: RunLayout, evaluations: list[dict[str, Any]], latency: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per INT8 file: how it was made, what ONNX Runtime fused, and ``vs_fp32``.

    ``vs_fp32``: ``clean_drop``, ``attack_drop`` (PGD, or the first white-box attack, in
    transfer mode), ``corruption_drop`` (mean corruption accuracy), each FP32 minus INT8 on the
    same runtime (0.01 = one point; null when not measured); ``top1_agreement`` and
    ``label_flip_rate`` against the FP32 file on clean images and on all suite inputs,
    ``top1_agreement_adversarial`` on the PGD-transfer images;
    segmentation rows add ``clean_miou_drop``, ``attack_miou_drop`` and ``corruption_miou_drop``
    (pixel accuracy is their ``*_drop``, agreement is per pixel);
    ``speedup`` (FP32 p50 / INT8 p50) per batch from the bench stage (from the quantize stage's
    own timing when the bench stage did not time the file) and ``slowdown`` (the largest INT8 /
    FP32 p50).
    """
    out = []
    quantized = read_result(layout, QUANTIZE, QuantizeResult)
    for file in quantized.files if quantized else []:
        record = file.to_json()
        runtime = _RUNTIME_OF_TARGET[record["target"]]
        model, calibration = record["model"], record["calibration"]
        fp32 = _find(evaluations, model=model, runtime=runtime, precision="fp32")
        int8 = _find(evaluations, model=model, runtime=runtime, precision="int8", calibration=calibration)
        vs: dict[str, Any] = {"runtime": runtime, "evaluated": fp32 is not None and int8 is not None}
        if fp32 is not None and int8 is not None:
            parity = int8.get("parity_fp32") or {}
            vs.update(
                clean_drop=_drop(fp32["clean_accuracy"], int8["clean_accuracy"]),
                attack_drop=_drop(_attack_accuracy(fp32), _attack_accuracy(int8)),
                corruption_drop=_drop(
                    fp32.get("corruptions", {}).get("mean_accuracy"),
                    int8.get("corruptions", {}).get("mean_accuracy"),
                ),
                top1_agreement=(parity.get("clean") or {}).get("top1_agreement"),
                label_flip_rate=(parity.get("clean") or {}).get("label_flip_rate"),
                top1_agreement_adversarial=(parity.get("adversarial") or {}).get("top1_agreement"),
                top1_agreement_all_inputs=(parity.get("all") or {}).get("top1_agreement"),
                label_flip_rate_all_inputs=(parity.get("all") or {}).get("label_flip_rate"),
                **_miou_drops(fp32, int8),
            )
        speedup = {}
        for row in latency:
            if row["model"] != model or row["runtime"] != runtime or row.get("calibration") != calibration:
                continue
            base = _find(latency, model=model, runtime=runtime, precision="fp32", batch=row["batch"])
            if base is not None:
                speedup[str(row["batch"])] = base["p50_ms"] / row["p50_ms"]
        if not speedup and record.get("speed"):  # no bench stage: the quantize stage's own timing
            speedup = {batch: row["speedup"] for batch, row in record["speed"]["batches"].items()}
        vs["speedup"] = speedup
        vs["slowdown"] = max((1 / s for s in speedup.values()), default=None)
        fusion = {k: v for k, v in record["fusion"].items() if k != "optimized_ops"}
        out.append({**{k: v for k, v in record.items() if k != "fusion"}, "fusion": fusion, "vs_fp32": vs})
    return out


def engines_section(layout: RunLayout) -> list[dict[str, Any]]:
    """The engine stage's engines: model, precision, calibration, file, key, TensorRT version, built."""
    engines = read_result(layout, ENGINE, EngineResult)
    return [e.to_json() for e in engines.engines] if engines else []


def quantization_gates(recipe: Recipe) -> list[Gate]:
    """The gates ``quantize.gate`` stands for (on by default), one set per quantised model,
    target runtime and calibration set (every set, unless the gate names one).

    Agreement is the task's: the arg-max class per image or pixel, or for a detector the same
    confident detections (:attr:`toolchain.tasks.base.Task.precision_agreement`). Missing
    metrics fail (a
    slowdown without a benchmark, a drop or an agreement without validation on that runtime),
    as every gate does.
    """
    cfg = recipe.quantize
    if not cfg.enabled or cfg.gate is None:
        return []
    gate = cfg.gate
    at_least = {
        "top1_agreement": gate.min_agreement,
        "top1_agreement_adversarial": gate.min_adversarial_agreement,
    }
    at_most = {
        "slowdown": gate.max_slowdown,
        "clean_drop": gate.max_clean_drop,
        "attack_drop": gate.max_pgd_drop,
        "corruption_drop": gate.max_corruption_drop,
    }
    calibrations = cfg.file_calibrations if gate.calibration == "all" else [gate.calibration]
    gates = []
    for model in cfg.models:
        for target in cfg.targets:
            for calibration in calibrations:
                where = f"quantization[model={model},target={target},calibration={calibration}].vs_fp32"
                for metric, limit in at_least.items():
                    if limit is not None:
                        gates.append(Gate(metric=f"{where}.{metric}", op=">=", threshold=limit))
                for metric, limit in at_most.items():
                    if limit is not None:
                        gates.append(Gate(metric=f"{where}.{metric}", op="<=", threshold=limit))
    return gates
