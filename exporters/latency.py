"""Latency of any Runner: percentiles over timed single calls, after warm-up."""

from __future__ import annotations

import time

import numpy as np
import torch

from exporters.base import Runner


def measure_latency(
    runner: Runner, *, batch: int = 1, warmup: int = 10, iterations: int = 50
) -> dict[str, float]:
    """Time ``iterations`` calls of ``runner`` on a random batch after ``warmup`` untimed calls.

    The batch is fixed (random pixels) so only the runtime is measured, not data loading.
    On CUDA runners the call already returns host tensors, so each timing includes the
    device synchronisation.

    Returns:
        ``{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput"}``; throughput in images/s
        from the median.
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    spec = runner.input_spec
    x = torch.rand(spec.shape(batch), generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        runner(x)
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        runner(x)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "throughput": batch / (p50 / 1e3) if p50 > 0 else 0.0,
    }
