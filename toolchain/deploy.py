"""The deployment stages' work: INT8 files (``quantize``), TensorRT engines (``engine``), and the
extra runners validation and benchmarks get from them.

The pipeline's stage functions call these; they read and write only the run directory's
``quantize/`` and ``engine/`` folders and their records, so the stages stay one call each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.data import CalibrationMix, Craft, build_calibration_set
from calibration.fusion import count_fused_kernels
from calibration.parity import compare_precisions
from calibration.qdq import quantize_onnx
from calibration.schemes import scheme_for_runtime
from exporters.base import Runner
from exporters.engine import EngineProfile, ensure_engine
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.tensorrt_runner import TensorRTRunner
from toolchain.machine import tensorrt_version
from toolchain.recipe import Recipe
from toolchain.robustness.attacks.pgd import pgd_attack
from toolchain.robustness.corruptions import corrupt
from toolchain.tasks import task_of

__all__ = [
    "build_engines",
    "engine_stage_needed",
    "int8_parity",
    "quantize_models",
    "tensorrt_version",
    "variant_labels",
    "variant_runners",
]

log = logging.getLogger(__name__)

QUANTIZE_RECORD = "quantize.json"
ENGINE_RECORD = "engines.json"


def engine_stage_needed(recipe: Recipe) -> bool:
    """Whether a runtime list asks for TensorRT engines."""
    bench = recipe.bench.runtimes if recipe.bench.enabled else []
    return "tensorrt" in recipe.validate.runtimes or "tensorrt" in bench


def quantize_models(
    recipe: Recipe,
    models: dict[str, nn.Module],
    export_dir: Path,
    out: Path,
    train_batches: Callable[[], Any],
) -> list[dict[str, Any]]:
    """Write one Q/DQ file per model x target runtime x calibration set, with its fused-kernel count.

    Args:
        recipe: its ``quantize`` section says what to write.
        models: the PyTorch models (adversarial calibration images are crafted on them).
        export_dir: where ``<model>.onnx`` are.
        out: the stage folder.
        train_batches: returns a fresh loader over training batches (calibration images).

    Returns:
        One record per file: model, target, scheme, calibration, file, counts, fusion, ...
    """
    cfg = recipe.quantize
    attack = {
        "eps": cfg.attack.eps,
        "steps": cfg.attack.steps,
        "step_size": cfg.attack.step_size,
        "norm": cfg.attack.norm,
    }
    records = []
    for name in cfg.models:
        for calibration in cfg.calibrations:
            mix = CalibrationMix() if calibration == "clean" else CalibrationMix(**cfg.mix.model_dump())
            images, counts = build_calibration_set(
                train_batches(),
                cfg.samples,
                mix,
                corruptions=cfg.corruptions,
                severities=cfg.severities,
                corrupt=corrupt,
                craft=_calibration_craft(models[name], attack, recipe.seed),
                seed=recipe.seed,
            )
            for target in cfg.targets:
                scheme = scheme_for_runtime(target)
                result = quantize_onnx(
                    export_dir / f"{name}.onnx",
                    out / f"{name}.int8-{scheme.name}-{calibration}.onnx",
                    images.numpy(),
                    scheme=scheme.name,
                    method=cfg.method,
                    per_channel=cfg.per_channel,
                    percentile=cfg.percentile,
                    exclude_nodes=cfg.exclude_nodes,
                    preprocess=cfg.preprocess,
                    metadata={
                        "calibration": calibration,
                        "calibration_counts": counts,
                        "target_runtime": target,
                    },
                )
                fusion = count_fused_kernels(result.path, threads=recipe.validate.threads)
                if target == "onnxruntime" and not fusion["all_integer"]:
                    log.warning(
                        "%s: ONNX Runtime fused only %d of %d convolutions into integer kernels; "
                        "the unfused ones run slower than in FP32",
                        result.path.name,
                        fusion["integer_conv"],
                        fusion["conv_nodes"],
                    )
                records.append(
                    {
                        "model": name,
                        "target": target,
                        "scheme": scheme.name,
                        "scheme_description": scheme.description,
                        "calibration": calibration,
                        "file": result.path.name,
                        "samples": result.samples,
                        "counts": counts,
                        "method": result.method,
                        "per_channel": result.per_channel,
                        "excluded_nodes": result.excluded_nodes,
                        "quantized_nodes": result.quantized_nodes,
                        "fusion": fusion,
                    }
                )
    return records


def _calibration_craft(model: nn.Module, attack: dict[str, Any], seed: int) -> Craft:
    """PGD on ``model`` in eval mode for the calibration set's adversarial share, one generator
    for the whole set (seeded once, so the set does not depend on how it is chunked)."""
    eps, steps = float(attack["eps"]), int(attack["steps"])
    step_size = float(attack.get("step_size") or 2.5 * eps / max(steps, 1))
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def craft(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return pgd_attack(
                model,
                x,
                y,
                eps=eps,
                step_size=step_size,
                steps=steps,
                norm=str(attack["norm"]),
                generator=generator,
            )
        finally:
            model.train(was_training)

    return craft


def build_engines(
    recipe: Recipe, export_dir: Path, quantize_dir: Path, quantized: list[dict[str, Any]], out: Path
) -> list[dict[str, Any]]:
    """Build (or reuse, by key) one TensorRT engine per model x precision (x calibration for INT8)."""
    cfg = recipe.engine
    profile = EngineProfile(cfg.min_batch, cfg.opt_batch, cfg.max_batch, cfg.workspace_mb)
    records = []
    for name in ("dense", "pruned"):
        sources: list[tuple[str, Path, str | None]] = [
            (p, export_dir / f"{name}.onnx", None) for p in cfg.precisions if p != "int8"
        ]
        if "int8" in cfg.precisions:
            sources += [
                ("int8", quantize_dir / q["file"], q["calibration"])
                for q in quantized
                if q["model"] == name and q["target"] == "tensorrt"
            ]
        for precision, source, calibration in sources:
            record = ensure_engine(source, out, precision, profile)
            records.append({"model": name, "calibration": calibration, **record.as_dict()})
    return records


def variant_labels(
    model_name: str, runtimes: list[str], quantized: list[dict[str, Any]], engines: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The extra runners a model gets, by suite key, with what the report says about each.

    ONNX Runtime gets the files quantised with its scheme (``onnxruntime/int8/<calibration>``);
    ``tensorrt`` gets the engine stage's engines (``tensorrt/<precision>[/<calibration>]``), so
    no engine is ever built as a side effect of validation or benchmarks.
    """
    out: dict[str, dict[str, Any]] = {}
    if "onnxruntime" in runtimes:
        for q in quantized:
            if q["model"] == model_name and q["target"] == "onnxruntime":
                out[f"onnxruntime/int8/{q['calibration']}"] = {
                    "calibration": q["calibration"],
                    "scheme": q["scheme"],
                    "file": q["file"],
                }
    if "tensorrt" in runtimes:
        for e in engines:
            if e["model"] == model_name:
                key = f"tensorrt/{e['precision']}" + (f"/{e['calibration']}" if e["calibration"] else "")
                labels = {
                    "engine": e["path"],
                    "tensorrt_version": e["tensorrt_version"],
                    "precision": e["precision"],
                }
                if e["calibration"]:
                    labels.update(calibration=e["calibration"], scheme=scheme_for_runtime("tensorrt").name)
                out[key] = labels
    return out


def variant_runners(
    labels: dict[str, dict[str, Any]], *, quantize_dir: Path, engine_dir: Path, threads: int, spinning: bool
) -> dict[str, Runner]:
    """Runners for :func:`variant_labels`' keys."""
    runners: dict[str, Runner] = {}
    for key, label in labels.items():
        if key.startswith("onnxruntime/"):
            runners[key] = OnnxRuntimeRunner(quantize_dir / label["file"], threads=threads, spinning=spinning)
        else:
            runners[key] = TensorRTRunner(engine_dir / label["engine"], precision=label["precision"])
    return runners


def int8_parity(
    recipe: Recipe,
    model: nn.Module,
    reference: Runner,
    candidates: dict[str, Runner],
    batches: Any,
) -> dict[str, dict[str, Any]]:
    """INT8 files against their FP32 file on clean, adversarial (the model's task's
    :meth:`~toolchain.tasks.Task.parity_craft`: the first white-box attack of ``validate.attacks``,
    crafted on the PyTorch model) and corrupted inputs (``validate``'s corruptions at their
    highest listed severity); per image, or per pixel for segmentation logits."""
    cfg = recipe.validate
    return compare_precisions(
        reference,
        candidates,
        batches,
        craft=task_of(model).parity_craft(model, cfg),
        corrupt=corrupt,
        corruptions=cfg.corruptions.names,
        severity=max(cfg.corruptions.severities, default=3),
        seed=cfg.corruptions.seed,
    )
