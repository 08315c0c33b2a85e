"""The runners a model is validated and benchmarked on: PyTorch, its exported file on each
runtime of a list, and the variants the quantize and engine stages made of it (INT8 files on
ONNX Runtime, TensorRT engines), each labelled with what the report says about it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from calibration.parity import compare_precisions
from calibration.schemes import scheme_for_runtime
from exporters.base import InputSpec, Runner
from exporters.batching import any_batch
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.runtimes import RUNTIMES, accepts, build_runner
from exporters.tensorrt_runner import TensorRTRunner
from toolchain.recipe import Recipe
from toolchain.report.stage_results import (
    EngineBuild,
    EngineResult,
    QuantizedFile,
    QuantizeResult,
    read_result,
)
from toolchain.robustness.corruptions import corrupt
from toolchain.robustness.suite import parity_craft
from toolchain.rundir import ENGINE, QUANTIZE, RunLayout
from toolchain.tasks import task_of

#: Suite key -> what the report records about that runner (calibration, scheme, file, engine, ...).
Labels = dict[str, dict[str, Any]]


def variant_labels(
    model_name: str, runtimes: Iterable[str], quantized: list[QuantizedFile], engines: list[EngineBuild]
) -> Labels:
    """The extra runners a model gets, by suite key, with what the report says about each.

    ONNX Runtime gets the files quantised with its scheme (``onnxruntime/int8/<calibration>``);
    ``tensorrt`` gets the engine stage's engines (``tensorrt/<precision>[/<calibration>]``), so
    no engine is ever built as a side effect of validation or benchmarks.
    """
    runtimes = list(runtimes)
    out: Labels = {}
    if "onnxruntime" in runtimes:
        for q in quantized:
            if q.model == model_name and q.target == "onnxruntime":
                out[f"onnxruntime/int8/{q.calibration}"] = {
                    "calibration": q.calibration,
                    "scheme": q.scheme,
                    "file": q.file,
                }
    if "tensorrt" in runtimes:
        for e in engines:
            if e.model == model_name:
                key = f"tensorrt/{e.precision}" + (f"/{e.calibration}" if e.calibration else "")
                labels = {"engine": e.path, "tensorrt_version": e.tensorrt_version, "precision": e.precision}
                if e.calibration:
                    labels.update(calibration=e.calibration, scheme=scheme_for_runtime("tensorrt").name)
                out[key] = labels
    return out


def run_labels(layout: RunLayout, model_name: str, runtimes: Iterable[str]) -> Labels:
    """:func:`variant_labels` from a run directory's quantize and engine records."""
    quantized = read_result(layout, QUANTIZE, QuantizeResult)
    engines = read_result(layout, ENGINE, EngineResult)
    return variant_labels(
        model_name,
        runtimes,
        quantized.files if quantized else [],
        engines.engines if engines else [],
    )


def variant_runners(labels: Labels, layout: RunLayout, *, threads: int, spinning: bool) -> dict[str, Runner]:
    """Runners for :func:`variant_labels`' keys."""
    runners: dict[str, Runner] = {}
    for key, label in labels.items():
        if key.startswith("onnxruntime/"):
            runners[key] = OnnxRuntimeRunner(
                layout.quantized(label["file"]), threads=threads, spinning=spinning
            )
        else:
            runners[key] = TensorRTRunner(layout.engine_file(label["engine"]), precision=label["precision"])
    return runners


def model_runners(
    layout: RunLayout,
    model_name: str,
    model: nn.Module,
    input_spec: InputSpec,
    runtimes: Iterable[str],
    threads: int,
    *,
    bench: bool = False,
) -> dict[str, Runner]:
    """Every runner of one model: PyTorch, its exported file on each runtime of ``runtimes``
    (``tensorrt`` through the engine stage's engines only), and its variants.

    Args:
        bench: for latency: ONNX Runtime spins its threads (which would starve interleaved
            PyTorch work in validation), and each runner keeps its own batch size; otherwise
            runners accept any batch size.
    """
    runtimes = list(runtimes)
    runners: dict[str, Runner] = {}
    for runtime in runtimes:
        source = RUNTIMES.get(runtime).source
        if source == "model":
            runners[runtime] = build_runner(runtime, model=model, input_spec=input_spec)
        elif source == "onnx":
            # Spinning threads help latency but starve interleaved PyTorch work in validation.
            options = {"spinning": bench} if accepts(runtime, "spinning") else {}
            runners[runtime] = build_runner(runtime, path=layout.onnx(model_name), threads=threads, **options)
        # "engine" runtimes run the engine stage's engines only, below.
    labels = run_labels(layout, model_name, runtimes)
    runners.update(variant_runners(labels, layout, threads=threads, spinning=bench))
    if not bench:  # the suites feed any batch size; latency is measured at the engine's own
        runners = {key: any_batch(r) for key, r in runners.items()}
    return runners


def int8_parity(
    recipe: Recipe,
    model: nn.Module,
    reference: Runner,
    candidates: Mapping[str, Runner],
    batches: Any,
) -> dict[str, dict[str, Any]]:
    """INT8 files against their FP32 file on clean, adversarial
    (:func:`~toolchain.robustness.suite.parity_craft`: PGD at the budget of the first white-box
    attack of ``validate.attacks``, crafted on the PyTorch model) and corrupted inputs
    (``validate``'s corruptions at their highest listed severity); per image, or per pixel for
    segmentation logits."""
    cfg = recipe.validate
    return compare_precisions(
        reference,
        dict(candidates),
        batches,
        craft=parity_craft(model, cfg),
        corrupt=corrupt,
        corruptions=cfg.corruptions.names,
        severity=max(cfg.corruptions.severities, default=3),
        seed=cfg.corruptions.seed,
        agreement=task_of(model).precision_agreement,
    )
