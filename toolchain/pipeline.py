"""The pipeline: recipe -> data+model -> the stages in order -> report.

A short loop over :data:`toolchain.stages.STAGES`. Each stage writes its artifacts into the run
directory with a key over everything it read; a stage whose key did not change and whose
upstream stages did not run again is loaded instead of re-run, so an interrupted run resumes,
and editing ``finetune`` re-runs fine-tuning and what follows only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from toolchain import distributed, preflight
from toolchain.data import load_data
from toolchain.device import resolve_device
from toolchain.killpoints import killpoint
from toolchain.recipe import Recipe
from toolchain.report.assemble import assemble_report
from toolchain.report.schema import Report
from toolchain.report.writer import mark_stale, mark_stale_before_start, write_report
from toolchain.rundir import STAGE_NAMES, RunDir
from toolchain.stages import STAGES, Stage, StageContext
from toolchain.stages.inputs import InputDigests, input_digests

log = logging.getLogger(__name__)


def stage_keys(recipe: Recipe, inputs: InputDigests | None = None) -> dict[str, str]:
    """Each stage's key for ``recipe`` (see :meth:`toolchain.stages.Stage.key`).

    Args:
        recipe: the recipe.
        inputs: the digests of its input files; computed here (loading the data) when not given.
    """
    if inputs is None:
        d = recipe.data
        data = load_data(
            d.dataset,
            root=d.root,
            image_size=d.image_size,
            train_samples=1,
            val_samples=1,
            seed=recipe.data_seed,
            task=recipe.task,
        )
        inputs = input_digests(recipe, data)
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.name] = stage.key(recipe, inputs, keys)
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
        the previous reports are marked stale before anything else, preflight included).

    Raises:
        UserError: bad names, missing data or checkpoints, or an unusable run directory; raised
            before anything is written.
    """
    root = Path(out) if out is not None else Path("runs") / recipe.name
    if distributed.launched_rank() == 0:  # first: a run refused below leaves no old verdict
        mark_stale_before_start(root)
    data = preflight.check(recipe)
    inputs = input_digests(recipe, data)
    world, device = distributed.setup(resolve_device(recipe.device))
    try:
        if not world.main:  # writes nothing: trains its share, then waits for rank 0's report
            ctx = StageContext(recipe, RunDir(root), data, inputs, device=device, world=world)
            return _run_stages(ctx, progress)
        with RunDir.open(root, recipe.model_dump(mode="json")) as run:
            ctx = StageContext(recipe, run, data, inputs, device=device, world=world)
            return _run_stages(ctx, progress)
    finally:
        distributed.teardown()


def _run_stages(ctx: StageContext, progress: bool) -> Report:
    """The stages in order. Under torchrun every rank trains and fine-tunes (data parallel) and
    validates its share of the models; rank 0 alone prunes, exports, quantises, benchmarks and
    writes, then sends the report."""
    if ctx.world.main:
        mark_stale(ctx.run.root)
    ctx.progress = progress and ctx.world.main
    ctx.keys = stage_keys(ctx.recipe, ctx.inputs)
    for stage in STAGES:
        _run_stage(ctx, stage)
    if not ctx.world.main:
        return Report.model_validate(distributed.broadcast(None))
    report = assemble_report(ctx.run, ctx.recipe, data_name=ctx.data.name)
    write_report(ctx.run.root, report)
    if ctx.world.distributed:
        distributed.broadcast(report.to_json())
    return report


def _run_stage(ctx: StageContext, stage: Stage) -> None:
    """Run ``stage`` unless it finished with its key after the current runs of its upstream
    stages (then load what later stages need from it).

    Under torchrun, a ``parallel`` stage runs on every rank (rank 0 decides whether it runs and
    alone records it); any other stage runs on rank 0 only, the others skip it.
    """
    name, key = stage.name, ctx.keys[stage.name]
    if not ctx.world.main and not stage.parallel:
        return
    upstream = {u: ctx.run.run_id(u) for u in stage.after} if ctx.world.main else {}
    done = ctx.run.finished(name, key, upstream) is not None if ctx.world.main else None
    if stage.parallel and ctx.world.distributed:
        done = distributed.broadcast(done)
    if done:
        log.info("stage %-8s up to date, skipped", name)
        if ctx.world.main:
            stage.load(ctx)
        return
    log.info("stage %-8s running", name)
    start = time.perf_counter()
    if ctx.world.main:
        ctx.run.stage_dir(name)
    # Each stage seeds torch's global generator itself, so what it draws does not depend on
    # which earlier stages ran in this process or were loaded from a previous one (resume).
    torch.manual_seed(ctx.recipe.seed + STAGE_NAMES.index(name))
    output = stage.run(ctx)
    if ctx.world.main:
        killpoint(f"stage:{name}")
        ctx.run.finish(
            name, key, upstream, output.artifacts, output.result.to_json(), time.perf_counter() - start
        )
    log.info("stage %-8s done in %.1f s", name, time.perf_counter() - start)
