"""``engine``: TensorRT engines, when a runtime list names ``tensorrt``.

An engine is only valid for the TensorRT that built it, so the stage's key covers the installed
version (a copied run directory rebuilds), and whether any runtime list asks for engines (adding
``tensorrt`` to ``validate.runtimes`` of a finished run builds them, and re-runs what follows).
"""

from __future__ import annotations

from pathlib import Path

from exporters.engine import EngineProfile, ensure_engine
from exporters.runtimes import RUNTIMES
from toolchain.machine import tensorrt_version
from toolchain.recipe import Recipe
from toolchain.report.stage_results import (
    EngineBuild,
    EngineResult,
    QuantizedFile,
    QuantizeResult,
    read_result,
)
from toolchain.rundir import ENGINE, ENGINE_RECORD, MODEL_STAGES, QUANTIZE, RunLayout, write_json
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext
from toolchain.stages.inputs import InputDigests


def engine_stage_needed(recipe: Recipe) -> bool:
    """Whether a runtime list names a runtime that runs prebuilt engines (TensorRT)."""
    bench = recipe.bench.runtimes if recipe.bench.enabled else []
    wanted = {*recipe.validate.runtimes, *bench}
    return any(RUNTIMES.get(r).source == "engine" for r in wanted if r in RUNTIMES)


class Engine(Stage):
    """Builds (or reuses, by cache key) one engine per model x ``engine.precisions`` (INT8 from
    the quantize stage's TensorRT-scheme files), and records them (none when not needed)."""

    name = ENGINE
    sections = ("engine",)
    after = (QUANTIZE,)

    def key_parts(self, recipe: Recipe, inputs: InputDigests) -> tuple[str, ...]:
        return (f"tensorrt={tensorrt_version() or 'none'}", f"needed={engine_stage_needed(recipe)}")

    def run(self, ctx: StageContext) -> StageOutput:
        engines: list[EngineBuild] = []
        if engine_stage_needed(ctx.recipe):
            quantized = read_result(ctx.run, QUANTIZE, QuantizeResult)
            engines = build_engines(ctx.recipe, ctx.run, quantized.files if quantized else [])
        write_json(ctx.run.engine_record, [e.to_json() for e in engines])
        return StageOutput([*(e.path for e in engines), ENGINE_RECORD], EngineResult(engines=engines))


def build_engines(recipe: Recipe, layout: RunLayout, quantized: list[QuantizedFile]) -> list[EngineBuild]:
    """Build (or reuse, by key) one TensorRT engine per model x precision (x calibration for INT8)."""
    cfg = recipe.engine
    profile = EngineProfile(cfg.min_batch, cfg.opt_batch, cfg.max_batch, cfg.workspace_mb)
    out = layout.stage_path(ENGINE)
    records = []
    for role in MODEL_STAGES:
        sources: list[tuple[str, Path, str | None]] = [
            (p, layout.onnx(role), None) for p in cfg.precisions if p != "int8"
        ]
        if "int8" in cfg.precisions:
            sources += [
                ("int8", layout.quantized(q.file), q.calibration)
                for q in quantized
                if q.model == role and q.target == "tensorrt"
            ]
        for precision, source, calibration in sources:
            record = ensure_engine(source, out, precision, profile)
            records.append(EngineBuild(model=role, calibration=calibration, **record.as_dict()))
    return records
