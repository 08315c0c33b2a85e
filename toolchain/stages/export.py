"""``export``: ONNX files of the dense and pruned models, each checked against PyTorch."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from exporters.onnx import check_parity, export_onnx
from exporters.outputs import as_tuple
from exporters.parity import ParityResult, float64_check
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain.errors import UserError
from toolchain.report.schema import ExportParity, Float64Parity
from toolchain.report.stage_results import ExportResult
from toolchain.rundir import EXPORT, FINETUNE, MODEL_STAGES, PARITY_FILE, write_json
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext

log = logging.getLogger(__name__)


class Export(Stage):
    """Exports each model (dynamic batch, metadata, ``onnx.checker``) and measures its parity
    against PyTorch on real validation images; an ONNX file that disagrees is recorded (with a
    float64 check that tells float32 rounding from a wrong export), not refused: the intrinsic
    ``engine-parity`` gate judges it."""

    name = EXPORT
    sections = ("export",)
    after = (FINETUNE,)

    def run(self, ctx: StageContext) -> StageOutput:
        parity: dict[str, ExportParity] = {}
        artifacts = []
        for role in MODEL_STAGES:
            path = ctx.run.onnx(role)
            model = ctx.models[role]
            export_onnx(
                model,
                path,
                input_spec=ctx.input_spec,
                opset=ctx.recipe.export.opset,
                dynamic_batch=ctx.recipe.export.dynamic_batch,
                metadata={
                    "class_names": list(ctx.data.class_names),
                    "mean": list(ctx.data.mean),
                    "std": list(ctx.data.std),
                    "recipe_sha256": ctx.recipe.sha256(),
                    "model": role,
                    "dataset": ctx.data.name,
                    "task": ctx.recipe.task,
                },
                output_names=ctx.task.output_names(_output_count(model, ctx)),
            )
            parity[role] = _parity(ctx, role, model)
            artifacts.append(path.name)
            if ctx.recipe.export.end_to_end:
                parity[role].end_to_end_agreement = _end_to_end(ctx, role)
                artifacts.append(ctx.run.end_to_end_onnx(role).name)
        write_json(ctx.run.parity, {role: p.to_json() for role, p in parity.items()})
        return StageOutput([*artifacts, PARITY_FILE], ExportResult(parity=parity))


def _output_count(model: nn.Module, ctx: StageContext) -> int:
    with torch.no_grad():
        return len(as_tuple(model.eval()(ctx.example_inputs)))


def _end_to_end(ctx: StageContext, role: str) -> float:
    """Write ``role``'s end-to-end file and return the share of its confident detections that
    the raw file's, post-processed on the host, match (the task's rule)."""
    target = ctx.run.end_to_end_onnx(role)
    agreement = ctx.task.write_end_to_end(ctx.run.onnx(role), target)
    if agreement is None:  # preflight refuses export.end_to_end for such a task
        raise UserError(
            f"export.end_to_end: task {ctx.recipe.task!r} has no post-processing to put in a graph"
        )
    threads = ctx.recipe.validate.threads
    raw = build_runner("onnxruntime", path=ctx.run.onnx(role), threads=threads)
    in_graph = build_runner("onnxruntime", path=target, threads=threads)
    agree = compared = 0
    batch = None if ctx.recipe.export.dynamic_batch else 1
    for x, _ in ctx.val_loader(batch_size=batch, samples=ctx.recipe.export.parity_samples):
        a, n = agreement(raw(x), in_graph(x))
        agree, compared = agree + a, compared + n
    share = agree / compared if compared else 1.0
    if share < 1.0:
        log.warning("%s: the end-to-end file's detections match the host's on %.4f of them", role, share)
    return share


def _finite(value: float) -> float | None:
    # NaN/Inf logits make the difference infinite; strict JSON records it as null.
    return value if math.isfinite(value) else None


def _parity(ctx: StageContext, role: str, model: nn.Module) -> ExportParity:
    cfg = ctx.recipe.export
    runner = build_runner("onnxruntime", path=ctx.run.onnx(role), threads=ctx.recipe.validate.threads)
    batch = None if cfg.dynamic_batch else 1

    def images():  # type: ignore[no-untyped-def]
        return (x for x, _ in ctx.val_loader(batch_size=batch, samples=cfg.parity_samples))

    result: ParityResult = check_parity(
        TorchRunner(model, ctx.input_spec), runner, images(), agreement=ctx.task.parity_agreement
    )
    parity = ExportParity(
        max_abs_diff=_finite(result.max_abs_diff),
        mean_abs_diff=_finite(result.mean_abs_diff),
        top1_agreement=result.top1_agreement,
        samples=result.samples,
        reference_max_abs=_finite(result.reference_max_abs),
        within_atol=result.max_abs_diff <= cfg.parity_atol,
    )
    if result.ties is not None:  # per-pixel outputs only
        parity.ties = result.ties  # type: ignore[attr-defined]  # an extra key the schema keeps
    if result.top1_agreement < 1.0 or not result.max_abs_diff <= cfg.parity_atol:
        log.warning(
            "%s: ONNX Runtime differs from PyTorch (max |dlogit| %.2e, top-1 agreement %.4f)",
            role,
            result.max_abs_diff,
            result.top1_agreement,
        )
        if math.isfinite(result.max_abs_diff):
            exact = float64_check(model, runner, images())
            parity.float64 = Float64Parity.model_validate(exact.as_dict())
            log.warning(
                "%s: against float64, PyTorch float32 is off by %.2e and ONNX Runtime by %.2e",
                role,
                exact.torch_fp32_max_abs_diff,
                exact.engine_max_abs_diff,
            )
    return parity
