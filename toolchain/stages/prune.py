"""``prune``: the recipe's pruning method to its budget (MACs, params, or a measured latency)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from calibration.bn import recalibrate_bn
from toolchain.preflight import prune_job
from toolchain.pruning import prune_model
from toolchain.pruning.latency_target import resolve_latency_budget, verify
from toolchain.recipe_prune import reduction_met
from toolchain.report.stage_results import PruneResult
from toolchain.rundir import DENSE, MODEL_FILE, PRUNE, TRAIN
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext, load_model, save_model


class Prune(Stage):
    """Runs ``prune.method`` on a fresh copy of the dense model (rank 0), re-estimates
    BatchNorm statistics, and saves the physically pruned model with its pruning history.

    A ``latency_reduction`` target is searched first as the MACs reduction that gives it on
    ``prune.target.latency`` (:mod:`toolchain.pruning.latency_target`), and the method's model
    is timed again; the target is met on that measurement.
    """

    name = PRUNE
    sections = ("prune",)
    after = (TRAIN,)

    def run(self, ctx: StageContext) -> StageOutput:
        cfg = ctx.recipe.prune
        # A fresh copy from disk: the dense model in memory stays intact for validation.
        model = load_model(ctx, TRAIN)
        job = prune_job(ctx.recipe, model, ctx.example_inputs, ctx.train_loader, ctx.progress)
        job.checkpoint = ctx.checkpoint(PRUNE)
        job.device = ctx.device  # methods train there; pruning itself works on the CPU copy
        job.teacher = ctx.models[DENSE]  # for distillation losses; training reads a frozen copy
        latency: dict[str, Any] | None = None
        if cfg.target.latency_reduction is None:
            result = prune_model(model, job, cfg)
        else:
            with tempfile.TemporaryDirectory(prefix="robustprune-latency-") as tmp:
                job.budget, search, meter = resolve_latency_budget(
                    model,
                    job.budget,
                    cfg.target.latency,
                    ctx.input_spec,
                    ctx.example_inputs,
                    job.ignored_layers,
                    Path(tmp),
                )
                result = prune_model(model, job, cfg)
                latency = verify(result.model, result.macs_reduction, search, meter)
            result.target_met = reduction_met(
                latency["measured_reduction"], cfg.target.reduction, cfg.tolerance
            )
        if cfg.bn_recalibration_batches:
            recalibrate_bn(
                result.model, ctx.train_loader(seed_offset=1), batches=cfg.bn_recalibration_batches
            )
        save_model(ctx, PRUNE, result.model, result.history, result.structure)
        record = PruneResult(
            method=result.method,
            target=cfg.target.as_dict(),
            tolerance=cfg.tolerance,
            target_met=result.target_met,
            dense_macs=result.dense_macs,
            dense_params=result.dense_params,
            macs=result.macs,
            params=result.params,
            macs_reduction=result.macs_reduction,
            params_reduction=result.params_reduction,
            steps=result.steps,
            info=result.info,
            trace=result.trace,
            structure=result.structure,
            latency=latency,
        )
        return StageOutput([MODEL_FILE], record)
