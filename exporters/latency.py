"""Latency of Runners: percentiles over timed single calls, after warm-up.

Comparisons (dense vs pruned, FP32 vs INT8) are only honest when every runner meets the same
machine conditions, so :func:`compare_latency` interleaves the runners in rounds instead of
timing one after the other: drift (thermal, other processes, threads still spinning from a
previous session) then lands on all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from exporters.base import Runner


def _stats(ms: np.ndarray, batch: int) -> dict[str, float | int]:
    p50 = float(np.percentile(ms, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "samples": len(ms),
        "throughput": batch / (p50 / 1e3) if p50 > 0 else 0.0,
    }


def compare_latency(
    runners: Mapping[str, Runner], *, batch: int = 1, warmup: int = 10, iterations: int = 50, rounds: int = 5
) -> dict[str, dict[str, float | int]]:
    """Time each runner ``iterations`` times on one random batch, interleaved in ``rounds``.

    Every runner gets ``warmup`` untimed calls first. The batch is fixed (random pixels), so
    only the runtime is measured, not data loading. Runners return host tensors, so each
    timing of a CUDA runner includes the device synchronisation.

    Returns:
        Per runner key: ``{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms", "samples",
        "throughput"}``, with throughput in images/s from the median; ``samples`` is the number
        of timed calls (with fewer than about 200, p99 is little more than the maximum).

    Raises:
        ValueError: ``iterations`` or ``rounds`` < 1, or runners with different input specs.
    """
    if iterations < 1 or rounds < 1:
        raise ValueError("iterations and rounds must be >= 1")
    specs = {r.input_spec.shape(batch) for r in runners.values()}
    if len(specs) != 1:
        raise ValueError(f"runners take different inputs {sorted(specs)}; compare like with like")
    x = torch.rand(specs.pop(), generator=torch.Generator().manual_seed(0))
    for runner in runners.values():
        for _ in range(warmup):
            runner(x)
    times: dict[str, list[float]] = {key: [] for key in runners}
    per_round = [iterations // rounds + (i < iterations % rounds) for i in range(rounds)]
    for count in per_round:
        for key, runner in runners.items():
            for _ in range(count):
                start = time.perf_counter()
                runner(x)
                times[key].append(time.perf_counter() - start)
    return {key: _stats(np.asarray(t) * 1e3, batch) for key, t in times.items()}


def measure_latency(
    runner: Runner, *, batch: int = 1, warmup: int = 10, iterations: int = 50
) -> dict[str, float | int]:
    """Latency of one runner (see :func:`compare_latency`)."""
    return compare_latency({"runner": runner}, batch=batch, warmup=warmup, iterations=iterations, rounds=1)[
        "runner"
    ]
