"""``bench``: latency percentiles of every model, runtime, variant and batch size (rank 0)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from exporters.base import Runner
from exporters.latency import compare_latency
from toolchain.report.schema import LatencyRow
from toolchain.report.stage_results import BenchResult
from toolchain.rundir import BENCH, ENGINE, LATENCY_FILE, write_json
from toolchain.stages.base import Stage, StageOutput
from toolchain.stages.context import StageContext
from toolchain.stages.runners import model_runners, run_labels

log = logging.getLogger(__name__)


class Bench(Stage):
    """Times every runner of each ``bench.runtimes`` runtime interleaved (so ratios are not
    skewed by drift), PyTorch with the recipe's thread count; rows say each runtime's threads.
    For a task that post-processes on the host (detection), rows add the post-processing time
    on real images (``postprocess_p50_ms``) and the sum (``end_to_end_p50_ms``)."""

    name = BENCH
    sections = ("bench",)
    after = (ENGINE,)

    def run(self, ctx: StageContext) -> StageOutput:
        rows = measure(ctx) if ctx.recipe.bench.enabled else []
        write_json(ctx.run.latency, [r.to_json() for r in rows])
        return StageOutput([LATENCY_FILE], BenchResult(rows=len(rows)))


def measure(ctx: StageContext) -> list[LatencyRow]:
    """The latency rows of the recipe's ``bench`` section."""
    cfg = ctx.recipe.bench
    by_model = {
        role: model_runners(ctx.run, role, m, ctx.input_spec, cfg.runtimes, cfg.threads, bench=True)
        for role, m in ctx.models.items()
    }
    labels = {role: run_labels(ctx.run, role, cfg.runtimes) for role in ctx.models}
    rows: list[LatencyRow] = []
    torch_threads = torch.get_num_threads()
    if "torch" in cfg.runtimes:
        torch.set_num_threads(cfg.threads)
    try:
        for runtime in cfg.runtimes:
            runners = {
                f"{role}:{key}": runner
                for role, group in by_model.items()
                for key, runner in group.items()
                if key.split("/")[0] == runtime
            }
            for batch in _bench_batches(runtime, runners, cfg.batch_sizes):
                stats = compare_latency(runners, batch=batch, warmup=cfg.warmup, iterations=cfg.iterations)
                if ctx.task.post_processes:
                    _add_post_processing(ctx, runners, stats, batch)
                for full_key, runner in runners.items():
                    role, _, key = full_key.partition(":")
                    extra: dict[str, Any] = {
                        k: v for k, v in labels[role].get(key, {}).items() if k != "precision"
                    }
                    rows.append(
                        LatencyRow(
                            model=role,
                            runtime=runner.runtime,
                            precision=runner.precision,
                            device=runner.device,
                            provider=getattr(runner, "provider", None),
                            **extra,
                            batch=batch,
                            threads=_threads_of(runner),
                            **stats[full_key],
                        )
                    )
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def _add_post_processing(
    ctx: StageContext, runners: dict[str, Runner], stats: dict[str, dict[str, Any]], batch: int
) -> None:
    """Time the task's host post-processing (detection: threshold, top-k, NMS) of each runner's
    outputs on ``batch`` real validation images (on random pixels the number of candidates,
    and so the time, would be nothing like a deployment's), and the sum with the network."""
    images = torch.cat([x for x, _ in ctx.val_loader(batch_size=batch, samples=batch)])
    images = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    iterations = max(ctx.recipe.bench.iterations // 5, 5)
    for key, runner in runners.items():
        out = runner(images)
        ctx.task.post_process(out)  # warm-up
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            ctx.task.post_process(out)
            times.append((time.perf_counter() - start) * 1e3)
        post = float(np.median(times))
        stats[key]["postprocess_p50_ms"] = post
        stats[key]["end_to_end_p50_ms"] = stats[key]["p50_ms"] + post


def _bench_batches(runtime: str, runners: dict[str, Runner], batch_sizes: list[int]) -> list[int]:
    fixed = {r.input_spec.batch for r in runners.values() if r.input_spec.batch is not None}
    if fixed and set(batch_sizes) != fixed:
        log.warning("%s engines have a fixed batch of %s: latency measured at that size only", runtime, fixed)
    return sorted(b for b in fixed if b is not None) if fixed else list(batch_sizes)


def _threads_of(runner: Runner) -> int | None:
    """The CPU threads a runner computes with: its session's intra-op count, torch's own count
    for a PyTorch model on the CPU, none for a GPU engine."""
    if runner.device != "cpu":
        return None
    if runner.runtime == "torch":
        return torch.get_num_threads()
    return getattr(runner, "threads", None)
