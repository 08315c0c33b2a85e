"""``quantize.qat``: quantisation-aware fine-tuning, one Q/DQ file per model and target runtime.

The quantize stage's files of calibration ``qat``. Each is made from a fake-quantised copy of
the PyTorch model (:func:`calibration.qat.prepare_qat`: BatchNorm folded, the target runtime's
INT8 scheme rounded in the forward pass, residual additions included) whose activation scales
start from ``quantize.qat.init`` on the clean calibration images, trained by the one training
loop with the recipe's robust loss (the FP32 model being quantised teaches the distillation
losses), checkpointed per epoch like every training stage, and written with its trained scales
(:func:`calibration.qat.export_qat`). The validate stage then judges the file like the
post-training ones. With ``quantize.target_agreement`` the layers whose rounding costs most
held-out agreement stay in float, chosen on the fake-quantised model before training
(:func:`calibration.qat_select.keep_sensitive_float`), as the post-training files keep theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from calibration.fusion import count_fused_kernels
from calibration.qat import init_activation_ranges, prepare_qat, qat_layers, qat_outputs
from calibration.qat_export import export_qat
from calibration.qat_select import keep_sensitive_float
from calibration.schemes import scheme_for_runtime
from calibration.select import HeldOut, MixedPrecision, measure_agreement
from exporters.outputs import as_tuple
from toolchain.recipe import QatConfig
from toolchain.report.stage_results import QuantizedFile
from toolchain.rundir import QUANTIZE
from toolchain.stages.context import StageContext
from toolchain.training import TrainCheckpoint, TrainHooks, train_model
from toolchain.training.distill import DISTILL_LOSSES

log = logging.getLogger(__name__)

#: The training loop's label (progress, log, and the ``step:qat`` kill point).
QAT_DESC = "qat"


def qat_files(
    ctx: StageContext, images_for: Callable[[str], tuple[torch.Tensor, HeldOut | None]]
) -> list[QuantizedFile]:
    """Fine-tune each of ``quantize.models`` under each target's INT8 rounding and write its file.

    With ``quantize.target_agreement``, the layers whose rounding costs most held-out agreement
    stay in float (:func:`calibration.qat_select.keep_sensitive_float`), chosen before training.

    Args:
        ctx: the stage's context.
        images_for: a model's name -> its calibration images, and its held-out images with the
            FP32 file's labels (None without a target).

    Returns:
        One record per model x target (calibration and method ``qat``; speed not yet measured).

    Raises:
        UserError: too few training images for the calibration set, or a model QAT cannot fold.
    """
    cfg = ctx.recipe.quantize
    qat = cfg.qat
    assert qat is not None  # the stage calls this only with quantize.qat set
    records = []
    for name in cfg.models:
        images, held_out = images_for(name)
        for target in cfg.targets:
            records.append(_one(ctx, qat, name, target, images, held_out))
    return records


def _one(
    ctx: StageContext, qat: QatConfig, name: str, target: str, images: torch.Tensor, held_out: HeldOut | None
) -> QuantizedFile:
    """Choose the float layers, train and write one model's file for one target runtime, and
    record it."""
    scheme = scheme_for_runtime(target)
    mixed = _float_layers(ctx, name, target, images, held_out)
    model, history = _train(ctx, qat, name, target, images, mixed.fp32_nodes if mixed else [])
    file = f"{name}.int8-{scheme.name}-qat.onnx"
    written = export_qat(
        model,
        ctx.run.quantized(file),
        input_spec=ctx.input_spec,
        opset=ctx.recipe.export.opset,
        dynamic_batch=ctx.recipe.export.dynamic_batch,
        metadata={**_metadata(ctx, name), "target_runtime": target, "quant_samples": len(images)},
        output_names=ctx.task.output_names(_output_count(ctx.models[name], ctx)),
    )
    fusion = count_fused_kernels(written.path, threads=ctx.recipe.validate.threads)
    # With a target, the written file on the same held-out images (after training, where the
    # search measured before it).
    holdout = (
        measure_agreement(written.path, held_out, threads=ctx.recipe.validate.threads).as_dict()
        if held_out is not None
        else None
    )
    log.info(
        "%s: QAT %s file %s after %d epochs (%d of %d convolutions fused by ONNX Runtime)",
        name,
        target,
        file,
        qat.epochs,
        fusion["integer_conv"],
        fusion["conv_nodes"],
    )
    return QuantizedFile(
        model=name,
        target=target,
        scheme=scheme.name,
        scheme_description=scheme.description,
        calibration="qat",
        file=file,
        samples=len(images),
        counts={"clean": len(images)},
        method="qat",
        per_channel=True,
        quantized_nodes=written.quantized_nodes,
        fusion=fusion,
        mixed_precision=mixed.as_dict() if mixed else None,
        holdout_agreement=holdout,
        qat={
            "epochs": qat.epochs,
            "loss": qat.loss,
            "init": qat.init,
            "learn_scales": qat.learn_scales,
            "history": history,
            "layers": len(qat_layers(model)),
            "rounded_outputs": [rounded.removesuffix(".qat_output") for rounded in qat_outputs(model)],
            "unmatched_nodes": written.unmatched_nodes,
            "float_nodes": written.float_nodes,
        },
    )


def _float_layers(
    ctx: StageContext, name: str, target: str, images: torch.Tensor, held_out: HeldOut | None
) -> MixedPrecision | None:
    """The layers QAT leaves in float to meet ``quantize.target_agreement`` (None: no target)."""
    cfg = ctx.recipe.quantize
    if held_out is None or cfg.target_agreement is None or cfg.qat is None:
        return None
    mixed = keep_sensitive_float(
        ctx.models[name],
        ctx.example_inputs,
        scheme_for_runtime(target),
        images.split(ctx.recipe.data.batch_size),
        held_out,
        cfg.target_agreement,
        adversarial_target=cfg.target_adversarial_agreement,
        init=cfg.qat.init,
        percentile=cfg.percentile,
    )
    log.info(
        "%s: QAT %s keeps %d layer(s) in float (%s): held-out agreement before training %s -> %s%s",
        name,
        target,
        len(mixed.fp32_nodes),
        ", ".join(mixed.fp32_nodes) or "none",
        mixed.all_int8.as_dict(),
        mixed.final.as_dict(),
        "" if mixed.met else " (target missed)",
    )
    return mixed


def _train(
    ctx: StageContext,
    qat: QatConfig,
    name: str,
    target: str,
    images: torch.Tensor,
    keep_float: Sequence[str] = (),
) -> tuple[nn.Module, list[dict[str, float]]]:
    """The fake-quantised copy of ``name``'s model (``keep_float`` layers left in float), its
    scales started on ``images``, trained (resuming from this loop's checkpoint when a killed run
    left one); on the CPU, eval mode."""
    recipe = ctx.recipe
    model = prepare_qat(
        ctx.models[name],
        ctx.example_inputs,
        scheme_for_runtime(target),
        learn_scales=qat.learn_scales,
        keep_float=keep_float,
    )
    init_activation_ranges(
        model, images.split(recipe.data.batch_size), method=qat.init, percentile=recipe.quantize.percentile
    )
    loop = f"qat-{name}-{target}"
    history = train_model(
        model,
        ctx.train_loader(seed_offset=4),
        qat,
        seed=recipe.seed + 400,
        desc=QAT_DESC,
        section="quantize.qat",
        progress=ctx.progress,
        device=ctx.device,
        hooks=TrainHooks(param_groups=_param_groups),
        checkpoint=TrainCheckpoint(ctx.run.checkpoint(QUANTIZE, loop), f"{ctx.keys[QUANTIZE]}/{loop}"),
        # QAT's teacher is the FP32 model it quantises: distilling from it trains for agreement
        # with the FP32 file, which is what the INT8 gate measures.
        teacher=ctx.models[name] if qat.loss in DISTILL_LOSSES else None,
    )
    return model.cpu().eval(), history


def _metadata(ctx: StageContext, name: str) -> dict[str, Any]:
    """What the export stage writes into its files, and the calibration."""
    return {
        "class_names": list(ctx.data.class_names),
        "mean": list(ctx.data.mean),
        "std": list(ctx.data.std),
        "recipe_sha256": ctx.recipe.sha256(),
        "model": name,
        "dataset": ctx.data.name,
        "task": ctx.recipe.task,
        "calibration": "qat",
    }


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weights with the section's weight decay; activation scales without (decay would shrink
    the grid, not regularise the model)."""
    scales: list[nn.Parameter] = []
    weights: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (scales if name.endswith(("input_scale", "output_scale")) else weights).append(param)
    groups: list[dict[str, Any]] = [{"params": weights}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    return groups


def _output_count(model: nn.Module, ctx: StageContext) -> int:
    """How many outputs the model has (the QAT file names them as the export stage did)."""
    with torch.no_grad():
        return len(as_tuple(model.eval()(ctx.example_inputs)))
