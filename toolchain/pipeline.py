"""The pipeline: recipe → data+model → train → prune → fine-tune → export → quantize → engine →
validate → bench → report.

Each stage writes its artifacts into the run directory with a key chained from the recipe
sections it depends on; a stage whose key did not change is loaded instead of re-run, so an
interrupted run resumes, and editing ``finetune`` re-runs fine-tuning and what follows only.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.bn import recalibrate_bn
from toolchain import deploy, distributed, pipeline_deploy, preflight
from toolchain.data import DataBundle
from toolchain.device import resolve_device
from toolchain.killpoints import killpoint
from toolchain.preflight import prune_job
from toolchain.pruning import (
    count_macs_params,
    prune_model,
    save_pruned,
)
from toolchain.pruning.latency_target import resolve_latency_budget, verify
from toolchain.recipe import Recipe
from toolchain.report.assemble import STAGES, assemble_report
from toolchain.report.schema import Report
from toolchain.report.writer import mark_stale, write_report
from toolchain.rundir import RunDir, atomic_path, chain_key
from toolchain.stage_context import MODEL_FILE, Context, load_model, shared_model
from toolchain.tasks import DEFAULT_TASK
from toolchain.training import TrainCheckpoint, train_model

log = logging.getLogger(__name__)


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's cache key: its own recipe sections chained onto its upstream stage's key."""
    # The task joins the key only when set, so classification runs keep their cached stages.
    task = ("task",) if recipe.task != DEFAULT_TASK else ()
    keys = {"train": chain_key(recipe.section_hash(*task, "data", "model", "train"))}
    keys["prune"] = chain_key(keys["train"], recipe.section_hash("prune"))
    keys["finetune"] = chain_key(keys["prune"], recipe.section_hash("finetune"))
    keys["export"] = chain_key(keys["finetune"], recipe.section_hash("export"))
    keys["quantize"] = chain_key(keys["export"], recipe.section_hash("quantize"))
    # An engine is only valid for the TensorRT that built it: a copied run directory rebuilds.
    trt = deploy.tensorrt_version() or "none"
    keys["engine"] = chain_key(keys["quantize"], recipe.section_hash("engine"), f"tensorrt={trt}")
    keys["validate"] = chain_key(keys["engine"], recipe.section_hash("validate"))
    keys["bench"] = chain_key(keys["engine"], recipe.section_hash("bench"))
    return keys


def run_pipeline(recipe: Recipe, out: str | Path | None = None, *, progress: bool = True) -> Report:
    """Run (or resume) every stage of ``recipe`` and write the report.

    Args:
        recipe: a validated recipe.
        out: the run directory; default ``runs/<recipe.name>``.
        progress: show progress bars (they switch themselves off when stderr is not a terminal,
            so CI logs keep only the per-epoch and per-stage lines).

    Returns:
        The report (also written to ``<out>/report.json``, last, with status ``completed``;
        the previous report is marked stale before the first stage runs).

    Raises:
        UserError: bad names, missing data or checkpoints, or an unusable run directory; raised
            before anything is written.
    """
    data = preflight.check(recipe)
    world, device = distributed.setup(resolve_device(recipe.device))
    root = Path(out) if out is not None else Path("runs") / recipe.name
    try:
        if not world.main:  # writes nothing: trains its share, then waits for rank 0's report
            return _run_stages(recipe, RunDir(root), data, progress, world, device)
        with RunDir.open(root, recipe.model_dump(mode="json")) as run:
            return _run_stages(recipe, run, data, progress, world, device)
    finally:
        distributed.teardown()


def _run_stages(
    recipe: Recipe, run: RunDir, data: DataBundle, progress: bool, world: distributed.World, device: str
) -> Report:
    """The stages in order. Under torchrun every rank trains and fine-tunes (data parallel) and
    validates its share of the models; rank 0 alone prunes, exports, quantises, benchmarks and
    writes, then sends the report."""
    if world.main:
        mark_stale(run.root)
    ctx = Context(
        recipe=recipe,
        run=run,
        data=data,
        progress=progress and world.main,
        keys=stage_keys(recipe),
        device=device,
        world=world,
    )
    dense = _stage(ctx, "train", lambda: _train(ctx), lambda: load_model(ctx, "train"), parallel=True)
    _stage(ctx, "prune", lambda: _prune(ctx), lambda: None)
    pruned = _stage(
        ctx, "finetune", lambda: _finetune(ctx), lambda: load_model(ctx, "finetune"), parallel=True
    )
    models = {"dense": dense, "pruned": pruned}
    _stage(ctx, "export", lambda: pipeline_deploy.export_stage(ctx, models), lambda: None)
    _stage(ctx, "quantize", lambda: pipeline_deploy.quantize_stage(ctx, models), lambda: None)
    _stage(ctx, "engine", lambda: pipeline_deploy.engine_stage(ctx), lambda: None)
    _stage(ctx, "validate", lambda: pipeline_deploy.validate_stage(ctx, models), lambda: None, parallel=True)
    if not world.main:
        return Report.model_validate(distributed.broadcast(None))
    _stage(ctx, "bench", lambda: pipeline_deploy.bench_stage(ctx, models), lambda: None)

    report = assemble_report(ctx.run.root, recipe, data_name=data.name, example_inputs=ctx.example_inputs)
    write_report(ctx.run.root, report)
    if world.distributed:
        distributed.broadcast(report.to_json())
    return report


def _stage(
    ctx: Context, name: str, compute: Callable[[], Any], load: Callable[[], Any], *, parallel: bool = False
) -> Any:
    """Run stage ``name`` unless it finished with its key (then ``load`` its result).

    Under torchrun, a ``parallel`` stage runs on every rank (rank 0 decides whether it runs and
    alone records it); any other stage runs on rank 0 only, the others skip it.
    """
    key = ctx.keys[name]
    if not ctx.world.main and not parallel:
        return None
    done = ctx.run.finished(name, key) is not None if ctx.world.main else None
    if parallel and ctx.world.distributed:
        done = distributed.broadcast(done)
    if done:
        log.info("stage %-8s up to date, skipped", name)
        return load() if ctx.world.main else None
    log.info("stage %-8s running", name)
    start = time.perf_counter()
    # Each stage seeds torch's global generator itself, so what it draws does not depend on
    # which earlier stages ran in this process or were loaded from a previous one (resume).
    torch.manual_seed(ctx.recipe.seed + STAGES.index(name))
    value, artifacts, result = compute()
    if ctx.world.main:
        killpoint(f"stage:{name}")
        ctx.run.finish(name, key, artifacts, result, time.perf_counter() - start)
    log.info("stage %-8s done in %.1f s", name, time.perf_counter() - start)
    return value


# --- stages -----------------------------------------------------------------------------------


def _save_model(
    ctx: Context, stage: str, model: nn.Module, history: list[Any], structure: list[Any] | None = None
) -> None:
    if not ctx.world.main:
        return
    path = ctx.run.stage_dir(stage) / MODEL_FILE
    with atomic_path(path) as tmp:
        save_pruned(
            tmp,
            spec=model.spec,  # type: ignore[arg-type]
            history=history,
            state_dict=model.state_dict(),
            structure=structure,
        )


CHECKPOINT_FILE = ".checkpoint.pt"


def _checkpoint(ctx: Context, stage: str) -> TrainCheckpoint:
    """A stage's per-epoch training checkpoint; only a run with the same stage key resumes from it."""
    return TrainCheckpoint(ctx.run.root / stage / CHECKPOINT_FILE, ctx.keys[stage])


def _train(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    model = preflight.recipe_model(ctx.recipe, ctx.data)
    history = train_model(
        model,
        ctx.train_loader(shard=True),
        ctx.recipe.train,
        seed=ctx.recipe.seed,
        desc="train",
        progress=ctx.progress,
        device=ctx.device,
        checkpoint=_checkpoint(ctx, "train"),
        data_parallel=True,
    )
    model.cpu()
    macs, params = count_macs_params(model, ctx.example_inputs)
    _save_model(ctx, "train", model, [])
    return model, [MODEL_FILE], {"epochs": history, "macs": macs, "params": params}


def _prune(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    cfg = ctx.recipe.prune
    # A fresh copy from disk: the dense model in memory stays intact for validation.
    model = load_model(ctx, "train")
    job = prune_job(ctx.recipe, model, ctx.example_inputs, ctx.train_loader, ctx.progress)
    job.checkpoint = _checkpoint(ctx, "prune")
    job.device = ctx.device  # methods train there; pruning itself works on the CPU copy
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
        result.target_met = latency["measured_reduction"] >= cfg.target.reduction * (1 - cfg.tolerance)
    if cfg.bn_recalibration_batches:
        recalibrate_bn(result.model, ctx.train_loader(seed_offset=1), batches=cfg.bn_recalibration_batches)
    _save_model(ctx, "prune", result.model, result.history, result.structure)
    summary = {
        "method": result.method,
        "target": cfg.target.as_dict(),
        "tolerance": cfg.tolerance,
        "target_met": result.target_met,
        "dense_macs": result.dense_macs,
        "dense_params": result.dense_params,
        "macs": result.macs,
        "params": result.params,
        "macs_reduction": result.macs_reduction,
        "params_reduction": result.params_reduction,
        "steps": result.steps,
        "info": result.info,
        "trace": result.trace,
        "structure": result.structure,
    }
    if latency is not None:
        summary["latency"] = latency
    return result.model, [MODEL_FILE], summary


def _finetune(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    model, shape = shared_model(ctx, "prune")
    history = train_model(
        model,
        ctx.train_loader(seed_offset=2, shard=True),
        ctx.recipe.finetune,
        seed=ctx.recipe.seed + 100,
        desc="finetune",
        progress=ctx.progress,
        device=ctx.device,
        checkpoint=_checkpoint(ctx, "finetune"),
        data_parallel=True,
    )
    model.cpu()
    macs, params = count_macs_params(model, ctx.example_inputs)
    _save_model(ctx, "finetune", model, shape["history"], shape["structure"])
    return model, [MODEL_FILE], {"epochs": history, "macs": macs, "params": params}
