"""``quantize``: static INT8 (Q/DQ) copies of the exported files, when ``quantize.enabled``.

One file per model x target runtime's scheme x calibration set (clean, or a mix of clean,
corrupted and adversarial images), with the count of convolutions ONNX Runtime fuses into
integer kernels. The calibration library (:mod:`calibration`) gets this project's corruptions
and attacks as callables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from calibration.data import CalibrationMix, Craft, build_calibration_set
from calibration.fusion import count_fused_kernels
from calibration.qdq import quantize_onnx
from calibration.schemes import scheme_for_runtime
from toolchain.recipe import AttackConfig, Recipe
from toolchain.report.stage_results import QuantizedFile, QuantizeResult
from toolchain.robustness.attacks.pgd import pgd_examples
from toolchain.robustness.corruptions import corrupt
from toolchain.rundir import EXPORT, QUANTIZE, QUANTIZE_RECORD, RunLayout, write_json
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext

log = logging.getLogger(__name__)


class Quantize(Stage):
    """Writes the INT8 files and their record (an empty record when quantisation is off)."""

    name = QUANTIZE
    sections = ("quantize",)
    after = (EXPORT,)

    def run(self, ctx: StageContext) -> StageOutput:
        files: list[QuantizedFile] = []
        if ctx.recipe.quantize.enabled:
            files = quantize_models(ctx.recipe, ctx.models, ctx.run, lambda: ctx.train_loader(seed_offset=3))
        write_json(ctx.run.quantize_record, [f.to_json() for f in files])
        return StageOutput([*(f.file for f in files), QUANTIZE_RECORD], QuantizeResult(files=files))


def quantize_models(
    recipe: Recipe,
    models: Mapping[str, nn.Module],
    layout: RunLayout,
    train_batches: Callable[[], Iterable[tuple[torch.Tensor, Any]]],
) -> list[QuantizedFile]:
    """Write one Q/DQ file per model x target runtime x calibration set, with its fused-kernel count.

    Args:
        recipe: its ``quantize`` section says what to write.
        models: the PyTorch models (adversarial calibration images are crafted on them).
        layout: the run directory (the exported files are read from it, the INT8 files written).
        train_batches: returns a fresh loader over training batches (calibration images).

    Returns:
        One record per file.
    """
    cfg = recipe.quantize
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
                craft=calibration_craft(models[name], cfg.attack, recipe.seed),
                seed=recipe.seed,
            )
            for target in cfg.targets:
                scheme = scheme_for_runtime(target)
                result = quantize_onnx(
                    layout.onnx(name),
                    layout.quantized(f"{name}.int8-{scheme.name}-{calibration}.onnx"),
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
                    QuantizedFile(
                        model=name,
                        target=target,
                        scheme=scheme.name,
                        scheme_description=scheme.description,
                        calibration=calibration,
                        file=result.path.name,
                        samples=result.samples,
                        counts=counts,
                        method=result.method,
                        per_channel=result.per_channel,
                        excluded_nodes=result.excluded_nodes,
                        quantized_nodes=result.quantized_nodes,
                        fusion=fusion,
                    )
                )
    return records


def calibration_craft(model: nn.Module, attack: AttackConfig, seed: int) -> Craft:
    """PGD on ``model`` (in eval mode) for the calibration set's adversarial share, one generator
    for the whole set (seeded once, so the set does not depend on how it is chunked)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return lambda x, y: pgd_examples(model, x, y, attack, generator)
