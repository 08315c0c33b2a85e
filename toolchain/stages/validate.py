"""``validate``: the robustness suite on every model and runtime (sharded by model under torchrun)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from torch import nn

from toolchain import distributed
from toolchain.report.schema import Evaluation
from toolchain.report.stage_results import ValidateResult
from toolchain.robustness import suite
from toolchain.robustness.corruptions.metrics import add_corruption_errors
from toolchain.rundir import (
    ENGINE,
    EVALUATIONS_FILE,
    EXPORT,
    MODEL_STAGES,
    QUANTIZE,
    VALIDATE,
    RunDir,
    write_json,
)
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext, shared_model
from toolchain.stages.runners import int8_parity, model_runners, run_labels


class Validate(Stage):
    """Evaluates PyTorch, the exported file on every ``validate.runtimes`` runtime, the INT8
    files and the engines of each model with the task's suite; INT8 files are also compared
    with their FP32 file. Corruption errors are computed relative to the dense model."""

    name = VALIDATE
    sections = ("validate",)
    after = (ENGINE,)
    parallel = True

    def run(self, ctx: StageContext) -> StageOutput:
        if not ctx.world.distributed:
            rows = [row for role, model in ctx.models.items() for row in evaluate(ctx, role, model)]
            return _record(ctx, rows)
        return _run_sharded(ctx)


def _run_sharded(ctx: StageContext) -> StageOutput:
    """Under torchrun the models are shared out among the ranks (rank r evaluates models
    r, r + n, ...), each on rank 0's saved model and exported files, and rank 0 gathers the
    evaluations in the single-process order."""
    roles = list(MODEL_STAGES)
    with tempfile.TemporaryDirectory(prefix="robustprune-rank-") as mirror:
        local = ctx if ctx.world.main else replace(ctx, run=RunDir(Path(mirror)))
        _receive_files(local, [EXPORT, QUANTIZE, ENGINE])
        mine = {}
        for index, role in enumerate(roles):
            model = shared_model(ctx, MODEL_STAGES[role])[0]  # every rank takes part in the broadcast
            if index % ctx.world.size == ctx.world.rank:
                logging.getLogger(__name__).info(
                    "validate: rank %d of %d evaluates %s", ctx.world.rank, ctx.world.size, role
                )
                mine[role] = [row.to_json() for row in evaluate(local, role, model)]
        gathered = {role: rows for part in distributed.all_gather(mine) for role, rows in part.items()}
    if not ctx.world.main:
        return StageOutput([], ValidateResult())
    return _record(ctx, [Evaluation.model_validate(row) for role in roles for row in gathered[role]])


def evaluate(ctx: StageContext, role: str, model: nn.Module) -> list[Evaluation]:
    """The suite on one model: PyTorch, its exported file and every variant of it."""
    cfg = ctx.recipe.validate
    runners = model_runners(ctx.run, role, model, ctx.input_spec, cfg.runtimes, cfg.threads)
    labels = run_labels(ctx.run, role, cfg.runtimes)
    batches = ctx.val_loader(batch_size=cfg.batch_size, samples=cfg.samples)
    rows = suite.evaluate(
        model,
        runners,
        batches,
        cfg,
        task=ctx.task,
        model_name=role,
        class_names=ctx.data.class_names,
        progress=ctx.progress,
    )
    int8 = {k: r for k, r in runners.items() if k.startswith("onnxruntime/int8/")}
    parity = int8_parity(ctx.recipe, model, runners["onnxruntime"], int8, batches) if int8 else {}
    for key, row in zip(runners, rows):
        for field_name, value in labels.get(key, {}).items():
            setattr(row, field_name, value)  # typed fields, or extra keys the schema keeps
        if key in parity:
            row.parity_fp32 = parity[key]
    return rows


def _record(ctx: StageContext, rows: list[Evaluation]) -> StageOutput:
    add_corruption_errors(rows)
    write_json(ctx.run.evaluations, [e.to_json() for e in rows])
    return StageOutput([EVALUATIONS_FILE], ValidateResult(count=len(rows)))


def _receive_files(ctx: StageContext, stages: list[str]) -> None:
    """Copy rank 0's files of ``stages`` into this rank's run folder (a no-op on rank 0),
    so no node needs a shared disk."""
    files = None
    if ctx.world.main:
        files = {
            str(path.relative_to(ctx.run.root)): path.read_bytes()
            for stage in stages
            for path in sorted(ctx.run.stage_path(stage).glob("*"))
            if path.is_file() and not path.name.startswith(".")
        }
    files = distributed.broadcast(files)
    if ctx.world.main:
        return
    for relative, content in files.items():
        target = ctx.run.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
