"""A latency budget: the MACs reduction whose pruned model is measurably that much faster.

Latency is not proportional to MACs (per-operator overhead, channel counts that vectorise
badly, memory-bound layers), so ``prune.target.latency_reduction`` is resolved by measurement
on the runtime, batch size and thread count the model ships with:

1. Candidate models are pruned one-shot from the dense model with the ``magnitude`` criterion
   under the recipe's constraints (``round_to``, ``max_layer_pruning``), exported (ONNX Runtime)
   and timed against the dense model, interleaved in rounds so drift hits both alike
   (:func:`exporters.latency.compare_latency`). The latency reduction is the ratio of medians.
2. The next candidate's MACs reduction comes from a secant step on log(latency reduction)
   against log(MACs reduction) through the two nearest measurements (bisection once the
   target is bracketed); the search stops at the first candidate within the tolerance above the
   target, else after ``max_probes`` candidates, keeping the smallest MACs reduction that met it.
3. The method then prunes to that MACs reduction (so methods that hold a MACs budget while they
   train keep working unchanged), and the model it returns is timed the same way. The report
   records that measured reduction, the one the search curve predicts for the achieved MACs,
   and every probe.

This is our own design. HALP (Shen et al., 2022) instead builds a per-layer latency look-up
table once and optimises channel counts against it; whole-model measurements are slower per
candidate but see what a table cannot (operator fusion, layout transforms, the thread pool).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters.base import InputSpec, Runner
from exporters.latency import compare_latency
from toolchain.pruning.budget import Budget, BudgetError
from toolchain.recipe_prune import LatencyProbe, reduction_met

log = logging.getLogger(__name__)

#: Bounds on the log-log slope used by the secant step: a flat or inverted measurement (noise)
#: must not send the next candidate to an absurd reduction.
_SLOPE_RANGE = (0.2, 2.0)


@dataclass
class Probe:
    """One measured candidate: its MACs reduction, the dense and candidate medians, their ratio."""

    macs_reduction: float
    dense_ms: float
    model_ms: float

    @property
    def latency_reduction(self) -> float:
        return self.dense_ms / self.model_ms

    def as_dict(self) -> dict[str, float]:
        return {
            "macs_reduction": self.macs_reduction,
            "dense_ms": self.dense_ms,
            "model_ms": self.model_ms,
            "latency_reduction": self.latency_reduction,
        }


@dataclass
class LatencySearch:
    """The search's outcome: the MACs reduction to prune to and the measurements behind it."""

    target: float
    macs_reduction: float
    probes: list[Probe] = field(default_factory=list)

    def predict(self, macs_reduction: float) -> float:
        """Latency reduction the measured curve gives at ``macs_reduction``.

        Piecewise linear in log-log space through (1, 1) and every probe (sorted by MACs
        reduction), extended beyond the last probe with the last segment's slope.
        """
        points = sorted({(1.0, 1.0), *((p.macs_reduction, p.latency_reduction) for p in self.probes)})
        logs = [(math.log(m), math.log(max(lat, 1e-9))) for m, lat in points]
        x = math.log(macs_reduction)
        if len(logs) == 1:
            return math.exp(x)  # no measurement: proportional to MACs
        for (x0, y0), (x1, y1) in itertools.pairwise(logs):
            if x <= x1 or (x1, y1) == logs[-1]:
                slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 1.0
                return math.exp(y0 + slope * (x - x0))
        raise AssertionError("unreachable")  # the loop returns on its last segment

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "macs_reduction": self.macs_reduction,
            "probes": [p.as_dict() for p in self.probes],
        }


class LatencyMeter:
    """Times models against the dense one on the probe's runtime, batch and threads.

    Args:
        dense: the dense model (never modified).
        input_spec: the model's input (channels, height, width).
        probe: runtime, batch, threads and iterations.
        workdir: where candidate ONNX files are written (a temporary folder by default).
    """

    def __init__(self, dense: nn.Module, input_spec: InputSpec, probe: LatencyProbe, workdir: Path) -> None:
        self.input_spec, self.probe, self.workdir = input_spec, probe, workdir
        self._count = 0
        self._dense = self._runner(dense)

    def _runner(self, model: nn.Module) -> Runner:
        model = model.eval()
        if self.probe.runtime == "torch":
            from exporters.torch_runner import TorchRunner

            return TorchRunner(model, self.input_spec)
        from exporters.onnx import export_onnx
        from exporters.ort_runner import OnnxRuntimeRunner

        self._count += 1
        path = export_onnx(model, self.workdir / f"candidate-{self._count}.onnx", input_spec=self.input_spec)
        # Spinning threads, as a deployment runs them (the latency benchmarks do the same).
        return OnnxRuntimeRunner(
            path, threads=self.probe.threads, providers=["CPUExecutionProvider"], spinning=True
        )

    def measure(self, model: nn.Module, macs_reduction: float) -> Probe:
        """Time ``model`` and the dense model interleaved; ``macs_reduction`` labels the result."""
        threads = torch.get_num_threads()
        if self.probe.runtime == "torch":
            torch.set_num_threads(self.probe.threads)
        try:
            stats = compare_latency(
                {"dense": self._dense, "model": self._runner(model)},
                batch=self.probe.batch,
                iterations=self.probe.iterations,
            )
        finally:
            torch.set_num_threads(threads)
        return Probe(macs_reduction, float(stats["dense"]["p50_ms"]), float(stats["model"]["p50_ms"]))


def search_macs_reduction(
    target: float,
    tolerance: float,
    candidate: Callable[[float], tuple[nn.Module, float]],
    meter: LatencyMeter,
    max_probes: int,
) -> LatencySearch:
    """The smallest MACs reduction found whose candidate is ``target`` times faster.

    Args:
        target: wanted latency reduction (dense / pruned median), > 1.
        tolerance: a candidate meets the target at ``>= target * (1 - tolerance)``; the search
            stops early at one within ``target * (1 + tolerance)``.
        candidate: prunes a copy of the dense model to a MACs reduction; returns the model and
            the MACs reduction it achieved. Raises :class:`BudgetError` when unreachable.
        meter: times candidates against the dense model.
        max_probes: candidates measured at most.

    Raises:
        BudgetError: no candidate reached the target (the most pruning allowed is too slow,
            or the probes ran out); the message names the best measured figure.
    """
    search = LatencySearch(target=target, macs_reduction=math.nan)
    low, high = 1.0, math.inf  # MACs reductions known to miss / to meet the target
    wanted = target
    for i in range(max_probes):
        try:
            model, achieved = candidate(wanted)
        except BudgetError:
            if math.isfinite(high):
                break
            high_reach = wanted
            wanted = math.sqrt(max(low, 1.0) * high_reach)
            log.info("latency search: %.2fx fewer MACs is not reachable; trying %.2fx", high_reach, wanted)
            if wanted <= low * 1.01:
                break
            continue
        probe = meter.measure(model, achieved)
        search.probes.append(probe)
        met = reduction_met(probe.latency_reduction, target, tolerance)
        log.info(
            "latency probe %d: %.2fx fewer MACs -> %.2fx lower latency (%.3f -> %.3f ms)%s",
            i + 1,
            achieved,
            probe.latency_reduction,
            probe.dense_ms,
            probe.model_ms,
            " (meets the target)" if met else "",
        )
        if met:
            high = min(high, achieved)
            if probe.latency_reduction <= target * (1 + tolerance):
                break
        else:
            low = max(low, achieved)
        wanted = _next_candidate(search.probes, target, low, high)
        if high < math.inf and wanted >= high * 0.99:
            break
    if not math.isfinite(high):
        best = max(search.probes, key=lambda p: p.latency_reduction, default=None)
        said = "no candidate could be pruned"
        if best is not None:
            said = f"the best candidate measured {best.latency_reduction:.2f}x"
            said += f" at {best.macs_reduction:.2f}x fewer MACs"
        raise BudgetError(
            f"prune.target.latency_reduction {target:g} was not reached on {meter.probe.runtime} "
            f"(batch {meter.probe.batch}, {meter.probe.threads} threads): {said}; lower the target, "
            "raise prune.max_layer_pruning or prune.target.latency.max_probes"
        )
    search.macs_reduction = high
    return search


def _next_candidate(probes: Sequence[Probe], target: float, low: float, high: float) -> float:
    """Secant step in log-log space from the probe nearest the target, kept inside (low, high)."""
    points = sorted({(1.0, 1.0), *((p.macs_reduction, p.latency_reduction) for p in probes)})
    nearest = min(points[1:], key=lambda mp: abs(math.log(mp[1] / target)))
    others = [p for p in points if p != nearest]
    other = min(others, key=lambda mp: abs(math.log(mp[0] / nearest[0])))
    dx = math.log(nearest[0] / other[0])
    slope = math.log(nearest[1] / other[1]) / dx if abs(dx) > 1e-9 else 1.0
    slope = min(max(slope, _SLOPE_RANGE[0]), _SLOPE_RANGE[1])
    wanted = nearest[0] * math.exp(math.log(target / nearest[1]) / slope)
    if math.isfinite(high) and not low < wanted < high:
        wanted = math.sqrt(low * high)  # bisect a bracket the secant step left
    return max(wanted, low * 1.01)


def resolve_latency_budget(
    dense: nn.Module,
    budget: Budget,
    probe: LatencyProbe,
    input_spec: InputSpec,
    example_inputs: torch.Tensor,
    ignored_layers: Sequence[nn.Module],
    workdir: Path | None = None,
) -> tuple[Budget, LatencySearch, LatencyMeter]:
    """Search the MACs budget that meets ``budget.reduction`` as a latency reduction.

    Args:
        dense: the dense model (copied, never modified).
        budget: the recipe's budget; its ``reduction`` is the latency target, its tolerance,
            ``round_to`` and ``max_layer_pruning`` constrain the candidates.
        probe: where latency is measured.
        input_spec: the model's input.
        example_inputs: a batch MACs are counted on.
        ignored_layers: layers whose output channels stay (the head).
        workdir: where candidate files go (default: a temporary folder kept for the meter).

    Returns:
        ``(macs_budget, search, meter)``: the budget to hand to the method, the search record,
        and the meter to time the method's model with (:func:`verify`).
    """

    def candidate(reduction: float) -> tuple[nn.Module, float]:
        return magnitude_candidate(dense, reduction, budget, example_inputs, ignored_layers)

    folder = workdir or Path(tempfile.mkdtemp(prefix="robustprune-latency-"))
    meter = LatencyMeter(copy.deepcopy(dense), input_spec, probe, folder)
    search = search_macs_reduction(budget.reduction, budget.tolerance, candidate, meter, probe.max_probes)
    log.info(
        "latency target %.2fx: pruning to %.2fx fewer MACs (%d candidates measured)",
        budget.reduction,
        search.macs_reduction,
        len(search.probes),
    )
    macs_budget = Budget(
        "macs", search.macs_reduction, budget.tolerance, budget.round_to, budget.max_layer_pruning
    )
    return macs_budget, search, meter


def magnitude_candidate(
    dense: nn.Module,
    macs_reduction: float,
    budget: Budget,
    example_inputs: torch.Tensor,
    ignored_layers: Sequence[nn.Module] = (),
) -> tuple[nn.Module, float]:
    """A copy of ``dense`` pruned one-shot by magnitude to ``macs_reduction`` under ``budget``'s
    tolerance, ``round_to`` and ``max_layer_pruning``; returns it and the reduction achieved.

    Raises:
        BudgetError: the reduction is not reachable under the constraints.
    """
    from toolchain.pruning.prune import prune_to_target

    model = copy.deepcopy(dense)
    result = prune_to_target(
        model,
        example_inputs=example_inputs,
        criterion="magnitude",
        macs_reduction=macs_reduction,
        steps=1,
        tolerance=budget.tolerance,
        round_to=budget.round_to,
        max_layer_pruning=budget.max_layer_pruning,
        ignored_layers=_same_layers(dense, model, ignored_layers),
        progress=False,
    )
    return result.model, result.macs_reduction


def verify(
    model: nn.Module, macs_reduction: float, search: LatencySearch, meter: LatencyMeter
) -> dict[str, Any]:
    """Time the method's pruned model: the report's ``latency`` record of the prune stage."""
    measured = meter.measure(copy.deepcopy(model).cpu(), macs_reduction)
    return {
        "runtime": meter.probe.runtime,
        "batch": meter.probe.batch,
        "threads": meter.probe.threads,
        "dense_ms": measured.dense_ms,
        "pruned_ms": measured.model_ms,
        "measured_reduction": measured.latency_reduction,
        "predicted_reduction": search.predict(macs_reduction),
        "search": search.record(),
    }


def _same_layers(source: nn.Module, copied: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """``layers`` of ``source`` as the corresponding modules of its deep copy ``copied``."""
    names = {id(m): n for n, m in source.named_modules()}
    by_name = dict(copied.named_modules())
    return [by_name[names[id(m)]] for m in layers if id(m) in names]
