"""Physically remove channels at a given ratio, and search the ratio that meets a MACs budget.

A channel ratio is not a MACs ratio (a 3x3 conv loses MACs through both its input and its
output channels, a head keeps all of its own), so the ratio is found by bisection: each
candidate prunes a deep copy, and torch-pruning counts what is left.

Pruning is local: every group keeps the same fraction of its current channels, ranked by the
criterion's scores. Groups never go below their floor (``max_layer_pruning`` of the *dense*
width, at least one channel) and, with ``round_to``, keep a multiple of it; torch-pruning's
own ``MetaPruner`` rounds down to zero channels on narrow layers and caps ``max_pruning_ratio``
only from its second step on, which is why groups are pruned here directly.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from toolchain.pruning.graph import (
    ROOT_TYPES,
    HistoryEntry,
    build_graph,
    count_macs_params,
    expand_ignored,
    group_key,
    plain_history,
)
from toolchain.pruning.scores import ScoreTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One evaluated pruning ratio and the size it leads to."""

    ratio: float
    macs: int
    params: int

    def value(self, metric: str) -> int:
        return self.macs if metric == "macs" else self.params


def channels_to_keep(size: int, ratio: float, *, round_to: int | None, floor: int) -> int:
    """Channels a group of ``size`` keeps at ``ratio``; non-increasing in ``ratio``.

    ``floor`` (at least 1) wins over the ratio; with ``round_to`` the count is rounded to the
    nearest multiple and the floor up to one, and a group narrower than ``round_to`` is kept.
    """
    keep = math.floor(size * (1.0 - ratio) + 1e-9)
    floor = max(floor, 1)
    if round_to:
        keep = round_to * int(keep / round_to + 0.5)
        floor = round_to * math.ceil(floor / round_to)
    return min(max(keep, floor), size)


def _channel_groups(group: Any) -> int:
    """Channel grouping a group must respect (grouped convs, GroupNorm), as torch-pruning does.

    Depthwise convs are not counted: their groups follow the channels one to one.
    """
    groups = 1
    for item in group:
        layer = item.dep.target.module
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
            if layer.groups != layer.out_channels:
                groups = max(groups, layer.groups)
        elif isinstance(layer, nn.GroupNorm):
            groups = max(groups, layer.num_groups)
    return groups


def prune_groups(
    model: nn.Module,
    example_inputs: Any,
    table: ScoreTable,
    ratio: float,
    *,
    floors: Mapping[str, int],
    round_to: int | None,
    ignored_layers: Sequence[nn.Module],
) -> list[HistoryEntry]:
    """Remove the lowest-scored ``ratio`` of every scored group's channels from ``model``.

    Args:
        model: pruned in place.
        example_inputs: inputs to trace the dependency graph.
        table: scores from :func:`~toolchain.pruning.scores.compute_scores` on this model (or
            on the model it was deep-copied from).
        ratio: fraction of each group's current channels to remove.
        floors: minimum output channels per root layer name (missing: 1).
        round_to: keep channel counts multiples of this.
        ignored_layers: layers whose output channels stay.

    Returns:
        The pruning history of this call, in JSON types.
    """
    graph = build_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    plans = []
    for group in graph.get_all_groups(
        ignored_layers=expand_ignored(ignored_layers), root_module_types=ROOT_TYPES
    ):
        key = group_key(group, names)
        scores = table.get(key)
        ch_groups = _channel_groups(group)
        if scores is None or len(scores) != len(group[0].idxs) or len(scores) % ch_groups:
            continue
        size = len(scores) // ch_groups
        floor = math.ceil(floors.get(key[0], 1) / ch_groups)
        keep = channels_to_keep(size, ratio, round_to=round_to, floor=floor)
        if keep >= size:
            continue
        # Grouped layers lose the same positions in every group, ranked by the mean score.
        per_position = scores.view(ch_groups, size).mean(0)
        drop = torch.argsort(per_position, stable=True)[: size - keep].tolist()
        idxs = sorted(d + g * size for g in range(ch_groups) for d in drop)
        plans.append((group[0].dep.target.module, group[0].dep.handler, idxs))
    for module, handler, idxs in plans:
        group = graph.get_pruning_group(module, handler, idxs)
        if graph.check_pruning_group(group):  # never empties a layer
            group.prune()
    return plain_history(graph.pruning_history())


def search_ratio(
    model: nn.Module,
    example_inputs: Any,
    table: ScoreTable,
    *,
    metric: str,
    target: float,
    floors: Mapping[str, int],
    round_to: int | None,
    ignored_names: Sequence[str],
    tolerance: float,
    max_evals: int = 20,
    progress: bool = False,
    desc: str = "search",
) -> tuple[Candidate, int]:
    """Bisect the ratio whose pruned copy has ``metric`` (MACs or params) closest to ``target``.

    Stops early once within a quarter of ``tolerance`` (measured as
    ``|target / achieved - 1|``, the relative error on the reduction factor).

    Returns:
        The closest candidate (ratio 0 when the model is already small enough, the largest
        reachable ratio when the target is out of reach) and the number of pruned copies made.
    """
    evals = 0

    def evaluate(ratio: float) -> Candidate:
        nonlocal evals
        evals += 1
        clone = copy.deepcopy(model)
        modules = dict(clone.named_modules())
        ignored = [modules[name] for name in ignored_names]
        prune_groups(
            clone, example_inputs, table, ratio, floors=floors, round_to=round_to, ignored_layers=ignored
        )
        return Candidate(ratio, *count_macs_params(clone, example_inputs))

    def error(candidate: Candidate) -> float:
        return abs(target / max(candidate.value(metric), 1) - 1.0)

    best = Candidate(0.0, *count_macs_params(model, example_inputs))
    if best.value(metric) <= target:
        return best, evals
    lo, hi = 0.0, 1.0
    with tqdm(total=max_evals, desc=desc, disable=None if progress else True, leave=False) as bar:
        smallest = evaluate(hi)  # ratio 1: every group at its floor
        bar.update()
        if smallest.value(metric) > target:
            return smallest, evals
        best = min(best, smallest, key=error)
        while evals < max_evals and error(best) > tolerance / 4 and hi - lo > 1e-4:
            mid = (lo + hi) / 2
            candidate = evaluate(mid)
            bar.update()
            best = min(best, candidate, key=error)
            if candidate.value(metric) > target:
                lo = mid
            else:
                hi = mid
    return best, evals
