"""Latency measurement logic, on fake runners whose cost is known.

The runners advance a fake clock instead of sleeping, so the expected numbers are exact and
no assertion depends on how busy the machine is.
"""

from __future__ import annotations

import pytest
import torch

import exporters.latency
from exporters.base import InputSpec, Runner
from exporters.latency import compare_latency, measure_latency


class FakeClock:
    """``time.perf_counter`` that moves only when a runner says it spent time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(exporters.latency, "time", fake)
    return fake


class SleepyRunner(Runner):
    """A fake runtime that takes ``seconds`` per call (``costs`` in turn, if given) on the fake
    clock and records the order of calls."""

    runtime = "fake"

    def __init__(
        self,
        seconds: float,
        log: list[str],
        key: str,
        spec: InputSpec | None = None,
        clock: FakeClock | None = None,
        costs: list[float] | None = None,
    ) -> None:
        super().__init__(input_spec=spec or InputSpec(3, 8, 8))
        self.seconds, self.log, self.key, self.clock = seconds, log, key, clock
        self.costs = list(costs or [])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.key)
        if self.clock is not None:
            self.clock.now += self.costs.pop(0) if self.costs else self.seconds
        return torch.zeros(len(x), 2)


def test_percentiles_reflect_the_cost_and_throughput_the_batch(clock: FakeClock) -> None:
    # One warm-up call (untimed), then 10 timed calls of 1..10 ms.
    costs = [0.5] + [ms / 1e3 for ms in range(1, 11)]
    stats = measure_latency(
        SleepyRunner(0, [], "a", clock=clock, costs=costs), batch=4, warmup=1, iterations=10
    )
    assert stats["p50_ms"] == pytest.approx(5.5) and stats["max_ms"] == pytest.approx(10.0)
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["throughput"] == pytest.approx(4 / (5.5 / 1e3))


def test_runners_are_interleaved_in_rounds_and_ranked_correctly(clock: FakeClock) -> None:
    log: list[str] = []
    slow = SleepyRunner(0.006, log, "slow", clock=clock)
    fast = SleepyRunner(0.001, log, "fast", clock=clock)
    stats = compare_latency({"slow": slow, "fast": fast}, warmup=1, iterations=6, rounds=3)
    timed = log[2:]  # after one warm-up call each
    assert timed == ["slow", "slow", "fast", "fast"] * 3
    assert stats["slow"]["p50_ms"] == pytest.approx(6.0) and stats["fast"]["p50_ms"] == pytest.approx(1.0)


def test_mismatched_inputs_and_bad_counts_are_rejected() -> None:
    a = SleepyRunner(0, [], "a")
    b = SleepyRunner(0, [], "b", InputSpec(1, 8, 8))
    with pytest.raises(ValueError, match="different inputs"):
        compare_latency({"a": a, "b": b})
    with pytest.raises(ValueError, match=">= 1"):
        compare_latency({"a": a}, iterations=0)
