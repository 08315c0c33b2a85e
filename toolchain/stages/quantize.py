"""``quantize``: static INT8 (Q/DQ) copies of the exported files, when ``quantize.enabled``.

One file per model x target runtime's scheme x calibration set (clean, or a mix of clean,
corrupted and adversarial images), with the count of convolutions ONNX Runtime fuses into
integer kernels. How activation ranges are chosen (``quantize.method``, ``auto`` by default)
and which layers stay in FP32 (``quantize.target_agreement``) are measured choices: agreement
with the FP32 file on held-out training images, clean and PGD-transfer (``quantize.attack``),
none of them used for calibration (the report's agreement is measured later, on the validation split). The
calibration library (:mod:`calibration`) gets this project's corruptions and attacks as
callables.

With ``quantize.bias_correction`` every post-training file (and each candidate the choices above
measure) has its INT8 layers' mean output shift taken out of their biases
(:mod:`calibration.bias`).

With ``quantize.qat`` the stage also fine-tunes each model under INT8 rounding and writes its
file of calibration ``qat`` (:mod:`toolchain.stages.qat`), timed like the others.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.data import CalibrationMix, Craft, build_calibration_set, take_images
from calibration.fusion import count_fused_kernels
from calibration.qdq import Calibration, calibrate, supports
from calibration.schemes import scheme_for_runtime
from calibration.select import HeldOut, choose_method, fewest_fp32, keep_sensitive_fp32, measure_agreement
from calibration.speed import int8_speed
from toolchain.errors import UserError
from toolchain.pruning.graph import count_macs_params
from toolchain.recipe import AttackConfig, QuantizeConfig, Recipe
from toolchain.report.stage_results import QuantizedFile, QuantizeResult
from toolchain.robustness.attacks.pgd import pgd_examples
from toolchain.robustness.corruptions import corrupt
from toolchain.rundir import EXPORT, QUANTIZE, QUANTIZE_RECORD, RunLayout, write_json
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext
from toolchain.stages.qat import qat_files

log = logging.getLogger(__name__)

#: Tasks whose first output is class scores on axis 1 (per image or per pixel): agreement is
#: measured on their arg-max. A detector's heads are not; it is calibrated with min/max.
_AGREEMENT_TASKS = ("classification", "segmentation")
#: Fewer held-out images than this cannot tell methods apart (one image is 6% of agreement).
_MIN_HELD_OUT = 16
#: A target that allows fewer disagreements than this on the held-out images is met or missed
#: by one or two images, so the FP32 layers it picks can fall short of it on other images.
_MIN_DISAGREEMENTS = 5


class Quantize(Stage):
    """Writes the INT8 files and their record (an empty record when quantisation is off)."""

    name = QUANTIZE
    sections = ("quantize",)
    after = (EXPORT,)

    def run(self, ctx: StageContext) -> StageOutput:
        files: list[QuantizedFile] = []
        cfg = ctx.recipe.quantize
        if cfg.enabled and cfg.calibrations:
            files = quantize_models(ctx.recipe, ctx.models, ctx.run, lambda: ctx.train_loader(seed_offset=3))
        if cfg.enabled and cfg.qat is not None:
            for record in qat_files(ctx, lambda name: _qat_images(ctx, name)):
                _warn_unfused(record)
                if record.target == "onnxruntime":
                    record.speed = _speed(
                        ctx.recipe, ctx.run, None, record, ctx.models[record.model], ctx.example_inputs
                    )
                files.append(record)
        write_json(ctx.run.quantize_record, [f.to_json() for f in files])
        return StageOutput([*(f.file for f in files), QUANTIZE_RECORD], QuantizeResult(files=files))


@dataclass
class _Images:
    """The training images the stage draws: the calibration images first, then the held-out ones."""

    calibration: list[tuple[torch.Tensor, Any]]
    held_out: tuple[torch.Tensor, Any] | None


def quantize_models(
    recipe: Recipe,
    models: Mapping[str, nn.Module],
    layout: RunLayout,
    train_batches: Callable[[], Iterable[tuple[torch.Tensor, Any]]],
) -> list[QuantizedFile]:
    """Write one Q/DQ file per model x target runtime x calibration set, with its fused-kernel count.

    Args:
        recipe: its ``quantize`` section says what to write.
        models: the PyTorch models (adversarial calibration and held-out images are crafted on
            them).
        layout: the run directory (the exported files are read from it, the INT8 files written).
        train_batches: returns a fresh loader over training batches (calibration images first,
            held-out images after them).

    Returns:
        One record per file.

    Raises:
        UserError: ``target_agreement`` on a task without class scores.
    """
    cfg = recipe.quantize
    measured = _check_target(recipe)
    wants_held_out = measured and (cfg.method == "auto" or cfg.target_agreement is not None)
    records = []
    for name in cfg.models:
        images, held_out = _draw_with_held_out(
            train_batches(), recipe, layout, name, models[name], wants_held_out
        )
        for calibration in cfg.calibrations:
            mix = CalibrationMix() if calibration == "clean" else CalibrationMix(**cfg.mix.model_dump())
            pixels, counts = build_calibration_set(
                images.calibration,
                cfg.samples,
                mix,
                corruptions=cfg.corruptions,
                severities=cfg.severities,
                corrupt=corrupt,
                craft=calibration_craft(models[name], cfg.attack, recipe.seed),
                seed=recipe.seed,
            )
            prepared = calibrate(layout.onnx(name), pixels.numpy(), preprocess=cfg.preprocess)
            for target in cfg.targets:
                records.append(
                    _quantize_one(recipe, layout, prepared, held_out, name, target, calibration, counts)
                )
                if target == "onnxruntime":
                    records[-1].speed = _speed(recipe, layout, prepared, records[-1], models[name], pixels)
    return records


def _check_target(recipe: Recipe) -> bool:
    """Whether the task's agreement can be measured; refuses ``target_agreement`` where not."""
    measured = recipe.task in _AGREEMENT_TASKS
    if recipe.quantize.target_agreement is not None and not measured:
        raise UserError(
            f"quantize.target_agreement needs class scores to measure agreement; task {recipe.task!r} "
            "has none: remove it (or list layers to keep in FP32 in quantize.exclude_nodes)"
        )
    return measured


def _qat_images(ctx: StageContext, name: str) -> tuple[torch.Tensor, HeldOut | None]:
    """QAT's calibration images for ``name`` and, with ``target_agreement``, the held-out images
    its mixed-precision search measures: drawn as the post-training files' are, the same images."""
    wants_held_out = _check_target(ctx.recipe) and ctx.recipe.quantize.target_agreement is not None
    images, held_out = _draw_with_held_out(
        ctx.train_loader(seed_offset=3), ctx.recipe, ctx.run, name, ctx.models[name], wants_held_out
    )
    return images.calibration[0][0], held_out


def _draw_with_held_out(
    batches: Iterable[tuple[torch.Tensor, Any]],
    recipe: Recipe,
    layout: RunLayout,
    name: str,
    model: nn.Module,
    wants_held_out: bool,
) -> tuple[_Images, HeldOut | None]:
    """The images the stage draws for ``name`` and, when it wants them and there are enough, the
    held-out ones with the FP32 file's labels (warning when they are too few for the target)."""
    images = _draw(batches, recipe.quantize, wants_held_out)
    if images.held_out is None:
        return images, None
    if coarse := coarse_target(recipe.quantize, len(images.held_out[0])):
        log.warning("%s", coarse)
    return images, _held_out(layout, name, model, recipe, images)


def coarse_target(cfg: QuantizeConfig, held_out: int) -> str | None:
    """Why ``target_agreement`` is too fine for ``held_out`` images to resolve (None: it is not).

    The mixed-precision search stops when the held-out images reach the target; with a target of
    0.99 on 256 images that is two disagreements, so one image decides, and the validation's
    images can disagree more often than the target allows.
    """
    targets = [t for t in (cfg.target_agreement, cfg.target_adversarial_agreement) if t is not None]
    if not targets:
        return None
    target = max(targets)
    allowed = (1 - target) * held_out
    if allowed >= _MIN_DISAGREEMENTS:
        return None
    enough = math.ceil(_MIN_DISAGREEMENTS / (1 - target)) if target < 1 else None
    fix = f"raise quantize.holdout_samples to {enough} or more" if enough else "lower the target below 1"
    return (
        f"quantize: target agreement {target:g} on {held_out} held-out images allows {allowed:.1f} "
        f"disagreements, so one or two images decide which layers stay FP32 and other images may fall "
        f"short of the target: {fix}"
    )


def _draw(batches: Iterable[tuple[torch.Tensor, Any]], cfg: QuantizeConfig, held_out: bool) -> _Images:
    """The calibration images, then up to ``holdout_samples`` held-out ones (a small training
    split gives fewer, with a warning; fewer than 16 is refused)."""
    total = cfg.samples + (cfg.holdout_samples if held_out else 0)
    xs, ys = take_images(batches, total, minimum=cfg.samples)
    calibration = [(xs[: cfg.samples], ys[: cfg.samples])]
    if not held_out:
        return _Images(calibration, None)
    x, y = xs[cfg.samples :], ys[cfg.samples :]
    if len(x) < _MIN_HELD_OUT:
        if cfg.target_agreement is not None:
            raise UserError(
                f"quantize.target_agreement is measured on training images the calibration does not use, "
                f"and only {len(x)} are left after quantize.samples ({cfg.samples}): lower samples"
            )
        log.warning(
            "quantize: only %d training images left after the calibration set: method auto falls back to "
            "minmax (lower quantize.samples to let it choose)",
            len(x),
        )
        return _Images(calibration, None)
    if len(x) < cfg.holdout_samples:
        log.warning("quantize: %d held-out images, not holdout_samples %d", len(x), cfg.holdout_samples)
    return _Images(calibration, (x, y))


def _held_out(
    layout: RunLayout, name: str, model: nn.Module, recipe: Recipe, images: _Images
) -> HeldOut | None:
    """The held-out images, clean and PGD-transfer (``quantize.attack`` crafted on the PyTorch
    model, as the validation's INT8 parity crafts its own; the stage's key covers only its own
    section, so a validate change does not redo the INT8 files), with the FP32 file's labels."""
    assert images.held_out is not None
    x, y = images.held_out
    craft = calibration_craft(model, recipe.quantize.attack, recipe.seed + 1)
    adversarial = torch.cat([craft(xc, yc).detach() for xc, yc in zip(x.split(128), y.split(128))])
    return HeldOut.of(
        layout.onnx(name),
        {"clean": x.numpy(), "adversarial": adversarial.numpy()},
        threads=recipe.validate.threads,
    )


def _quantize_one(
    recipe: Recipe,
    layout: RunLayout,
    prepared: Calibration,
    held_out: HeldOut | None,
    name: str,
    target: str,
    calibration: str,
    counts: dict[str, int],
) -> QuantizedFile:
    """Choose the method and the FP32 layers on the held-out images, then write the file."""
    cfg = recipe.quantize
    scheme = scheme_for_runtime(target)
    threads = recipe.validate.threads
    options: dict[str, Any] = {
        "scheme": scheme.name,
        "per_channel": cfg.per_channel,
        "percentile": cfg.percentile,
        "bias_correction": cfg.bias_correction,
    }
    method: str = cfg.method
    tried = None
    if method == "auto":
        if held_out is None:
            method = "minmax"
            log.info(
                "%s: quantize.method auto: no class scores to compare (%s), using minmax", name, recipe.task
            )
        else:
            method, tried = choose_method(
                prepared,
                [m for m in cfg.methods if supports(m, scheme.name)],
                held_out,
                exclude_nodes=cfg.exclude_nodes,
                threads=threads,
                **options,
            )
            log.info(
                "%s %s/%s: calibration method %s (held-out agreement %s)",
                name,
                target,
                calibration,
                method,
                {m: a.as_dict() for m, a in tried.items()},
            )
    mixed = None
    if cfg.target_agreement is not None and held_out is not None:
        search = {
            "adversarial_target": cfg.target_adversarial_agreement,
            "exclude_nodes": cfg.exclude_nodes,
            "threads": threads,
            **options,
        }
        if tried:  # auto: the method that needs fewest FP32 layers, not the best all-INT8 one
            method, mixed = fewest_fp32(prepared, tried, held_out, cfg.target_agreement, **search)
            log.info(
                "%s %s/%s: with target agreement %g, method %s (FP32 layers each method needed: %s)",
                name,
                target,
                calibration,
                cfg.target_agreement,
                method,
                mixed.methods_fp32_layers,
            )
        else:
            mixed = keep_sensitive_fp32(prepared, held_out, cfg.target_agreement, method=method, **search)
        if not mixed.met:
            log.warning(
                "%s: held-out agreement %s misses quantize.target_agreement even with %d layers in FP32",
                name,
                mixed.final.as_dict(),
                len(mixed.fp32_nodes),
            )
    result = prepared.write(
        layout.quantized(f"{name}.int8-{scheme.name}-{calibration}.onnx"),
        method=method,
        exclude_nodes=[*cfg.exclude_nodes, *(mixed.fp32_nodes if mixed else [])],
        metadata={"calibration": calibration, "calibration_counts": counts, "target_runtime": target},
        **options,
    )
    fusion = count_fused_kernels(result.path, threads=threads)
    record = QuantizedFile(
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
        bias_correction=result.bias_correction,
        bias_shift=result.bias_shift,
        excluded_nodes=result.excluded_nodes,
        quantized_nodes=result.quantized_nodes,
        fusion=fusion,
        methods_agreement={m: a.as_dict() for m, a in tried.items()} if tried else None,
        holdout_agreement=(
            measure_agreement(result.path, held_out, threads=threads).as_dict() if held_out else None
        ),
        mixed_precision=mixed.as_dict() if mixed else None,
    )
    _warn_unfused(record)
    return record


def _warn_unfused(record: QuantizedFile) -> None:
    """Warn when ONNX Runtime left more convolutions in float than the layers kept in FP32 on
    purpose (``exclude_nodes``, mixed precision) account for."""
    chosen = len(record.excluded_nodes or []) + len((record.qat or {}).get("float_nodes", []))
    unfused = record.fusion["conv_nodes"] - record.fusion["integer_conv"]
    if record.target == "onnxruntime" and record.fusion["conv_nodes"] and unfused > chosen:
        log.warning(
            "%s: ONNX Runtime fused only %d of %d convolutions into integer kernels (%d layer(s) kept "
            "in FP32 on purpose); the other unfused ones run slower than in FP32",
            record.file,
            record.fusion["integer_conv"],
            record.fusion["conv_nodes"],
            chosen,
        )


def _speed(
    recipe: Recipe,
    layout: RunLayout,
    prepared: Calibration | None,
    record: QuantizedFile,
    model: nn.Module,
    pixels: torch.Tensor,
) -> dict[str, Any]:
    """The INT8 file against its FP32 file on ONNX Runtime's CPU (the ``onnxruntime`` target), at
    the bench stage's batch sizes and threads; with layers kept in FP32, the all-INT8 file too
    (``prepared``: the calibration that wrote it; None for a QAT file)."""
    bench = recipe.bench
    macs, _ = count_macs_params(model, pixels[:1])
    with tempfile.TemporaryDirectory(prefix="robustprune-speed-") as tmp:
        all_int8 = None
        if prepared is not None and record.mixed_precision and record.mixed_precision["fp32_nodes"]:
            all_int8 = prepared.write(
                Path(tmp) / "all-int8.onnx",
                scheme=record.scheme,
                method=record.method or "minmax",
                per_channel=recipe.quantize.per_channel,
                percentile=recipe.quantize.percentile,
                exclude_nodes=recipe.quantize.exclude_nodes,
                bias_correction=recipe.quantize.bias_correction,
            ).path
        speed = int8_speed(
            layout.onnx(record.model),
            layout.quantized(record.file),
            record.fusion,
            batches=bench.batch_sizes,
            threads=bench.threads,
            iterations=bench.iterations,
            warmup=bench.warmup,
            all_int8=all_int8,
            macs=macs,
        )
    if not speed["faster"]:
        log.warning("%s is not faster than its FP32 file on ONNX Runtime: %s", record.file, speed["why_not"])
    return speed


def calibration_craft(model: nn.Module, attack: AttackConfig, seed: int) -> Craft:
    """PGD on ``model`` (in eval mode) for the calibration set's adversarial share, one generator
    for the whole set (seeded once, so the set does not depend on how it is chunked)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return lambda x, y: pgd_examples(model, x, y, attack, generator)
