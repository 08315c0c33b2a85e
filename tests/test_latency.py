"""Latency measurement logic, on fake runners whose cost is known."""

from __future__ import annotations

import time

import pytest
import torch

from exporters.base import InputSpec, Runner
from exporters.latency import compare_latency, measure_latency


class SleepyRunner(Runner):
    """A fake runtime that takes ``seconds`` per call and records the order of calls."""

    runtime = "fake"

    def __init__(self, seconds: float, log: list[str], key: str, spec: InputSpec | None = None) -> None:
        super().__init__(input_spec=spec or InputSpec(3, 8, 8))
        self.seconds, self.log, self.key = seconds, log, key

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.key)
        time.sleep(self.seconds)
        return torch.zeros(len(x), 2)


def test_percentiles_reflect_the_cost_and_throughput_the_batch() -> None:
    stats = measure_latency(SleepyRunner(0.004, [], "a"), batch=4, warmup=1, iterations=10)
    assert 4.0 <= stats["p50_ms"] < 15.0
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["throughput"] == pytest.approx(4 / (stats["p50_ms"] / 1e3))


def test_runners_are_interleaved_in_rounds_and_ranked_correctly() -> None:
    log: list[str] = []
    slow, fast = SleepyRunner(0.006, log, "slow"), SleepyRunner(0.001, log, "fast")
    stats = compare_latency({"slow": slow, "fast": fast}, warmup=1, iterations=6, rounds=3)
    timed = log[2:]  # after one warm-up call each
    assert timed == ["slow", "slow", "fast", "fast"] * 3
    assert stats["slow"]["p50_ms"] > 3 * stats["fast"]["p50_ms"]


def test_mismatched_inputs_and_bad_counts_are_rejected() -> None:
    a = SleepyRunner(0, [], "a")
    b = SleepyRunner(0, [], "b", InputSpec(1, 8, 8))
    with pytest.raises(ValueError, match="different inputs"):
        compare_latency({"a": a, "b": b})
    with pytest.raises(ValueError, match=">= 1"):
        compare_latency({"a": a}, iterations=0)
