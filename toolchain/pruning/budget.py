"""The pruning budget, and how a method's channel scores become a mask that meets it.

A budget is a MACs (or parameters) reduction factor with a tolerance; ``round_to`` and
``max_layer_pruning`` constrain every group. :func:`allocate` turns per-position scores into
a 0/1 mask over a :class:`~toolchain.pruning.masks.ChannelMasks`: groups are partitioned into
*pools* (each group alone: ``layer``; groups of one block: ``block``; all groups: ``global``);
inside a pool positions compete by score, every pool keeps the same fraction, and that
fraction is bisected on the masks' cost model until the budget is met. ``layer`` is the
uniform-ratio rule of the iterative method; ``global`` lets channels of different layers
compete, which only makes sense for scores that are comparable across layers (gates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from toolchain.errors import UserError
from toolchain.pruning.masks import ChannelMasks, MaskGroup
from toolchain.recipe_prune import reduction_met

Metric = Literal["macs", "params"]


class BudgetError(UserError):
    """The budget cannot be met under the recipe's constraints."""


@dataclass(frozen=True)
class Budget:
    """What "small enough" means for a pruned model.

    Attributes:
        metric: ``macs`` or ``params``.
        reduction: dense / pruned, > 1.
        tolerance: allowed relative error on the reduction factor.
        round_to: keep channel counts multiples of this (None: any count).
        max_layer_pruning: never remove more than this fraction of a group.
    """

    metric: Metric
    reduction: float
    tolerance: float = 0.05
    round_to: int | None = None
    max_layer_pruning: float = 0.9

    def __post_init__(self) -> None:
        if not self.reduction > 1.0:
            raise UserError(
                f"{self.metric}_reduction must be > 1 (4.0 keeps a quarter), got {self.reduction}"
            )
        if not 0.0 < self.tolerance < 1.0:
            raise UserError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"round_to must be >= 1 or None, got {self.round_to}")
        if not 0.0 < self.max_layer_pruning < 1.0:
            raise UserError(f"max_layer_pruning must be in (0, 1), got {self.max_layer_pruning}")

    def pick(self, macs: float, params: float) -> float:
        return macs if self.metric == "macs" else params

    def error(self, dense: float, achieved: float, reduction: float | None = None) -> float:
        """Relative error of the achieved reduction factor against ``reduction`` (default: ours)."""
        wanted = self.reduction if reduction is None else reduction
        return abs(dense / max(achieved, 1.0) / wanted - 1.0)

    def met(self, dense: float, achieved: float) -> bool:
        """At least ``reduction * (1 - tolerance)``: more reduction than asked is within budget."""
        return reduction_met(dense / max(achieved, 1.0), self.reduction, self.tolerance)


def channels_to_keep(size: int, ratio: float, *, round_to: int | None, floor: int) -> int:
    """Positions a group of ``size`` keeps at ``ratio``; non-increasing in ``ratio``.

    ``floor`` (at least 1) wins over the ratio; with ``round_to`` the count is rounded to the
    nearest multiple and the floor up to one, and a group narrower than ``round_to`` is kept.
    """
    keep = math.floor(size * (1.0 - ratio) + 1e-9)
    floor = max(floor, 1)
    if round_to:
        keep = round_to * int(keep / round_to + 0.5)
        floor = round_to * math.ceil(floor / round_to)
    return min(max(keep, floor), size)


def pools_for(
    masks: ChannelMasks, allocation: str, block_depth: int = 3, *, exclude: frozenset[int] = frozenset()
) -> list[list[int]]:
    """Partition the groups (by index) into pools for :func:`allocate`.

    ``block`` puts together groups whose root layer names share their first ``block_depth``
    dotted parts (``net.stages.1.conv1`` and ``net.stages.1.conv2`` at depth 3). Groups in
    ``exclude`` are in no pool: they keep every channel.
    """
    indices = [i for i in range(len(masks.groups)) if i not in exclude]
    if allocation == "layer":
        return [[i] for i in indices]
    if allocation == "global":
        return [indices]
    if allocation == "block":
        blocks: dict[str, list[int]] = {}
        for i, g in enumerate(masks.groups):
            blocks.setdefault(".".join(g.root.split(".")[:block_depth]), []).append(i)
        return list(blocks.values())
    raise UserError(f"unknown allocation {allocation!r}; use layer, block or global")


def _floor(group: MaskGroup, round_to: int | None) -> int:
    return min(group.positions, round_to * math.ceil(group.floor / round_to) if round_to else group.floor)


def _rounded(group: MaskGroup, keep: int, round_to: int | None) -> int:
    if round_to:
        keep = round_to * int(keep / round_to + 0.5)
    return min(max(keep, _floor(group, round_to)), group.positions)


def mask_for_fraction(
    masks: ChannelMasks,
    scores: Tensor,
    pools: Sequence[Sequence[int]],
    fraction: float,
    round_to: int | None,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """The 0/1 mask removing ``fraction`` of every pool's positions, lowest scores first.

    Each group keeps at least its floor (its own highest-scored positions); in a pool of one
    group the count follows :func:`channels_to_keep`. Groups in no pool keep every position.
    ``weights`` (one per group, layer pools only) scale the fraction per group, capped at 1:
    non-uniform per-layer ratios with one knob to bisect.
    """
    mask = torch.ones(masks.total)
    for pool in pools:
        for i in pool:
            mask[masks.groups[i].span] = 0.0
        groups = [masks.groups[i] for i in pool]
        if len(groups) == 1:
            g = groups[0]
            own = min(1.0, fraction * (weights[pool[0]] if weights is not None else 1.0))
            keep = {0: channels_to_keep(g.positions, own, round_to=round_to, floor=g.floor)}
        else:
            keep = _pool_counts(groups, scores, fraction, round_to)
        for j, g in enumerate(groups):
            top = torch.topk(scores[g.span], keep[j]).indices
            mask[g.offset + top] = 1.0
    return mask


def _pool_counts(
    groups: Sequence[MaskGroup], scores: Tensor, fraction: float, round_to: int | None
) -> dict[int, int]:
    """Per-group keep counts when the groups of one pool compete by score."""
    floors = [_floor(g, round_to) for g in groups]
    size = sum(g.positions for g in groups)
    wanted = max(sum(floors), math.floor(size * (1.0 - fraction) + 1e-9))
    # Floors are reserved first (each group's best positions); the rest compete globally.
    rest = []
    for j, g in enumerate(groups):
        ordered = torch.sort(scores[g.span], descending=True).values
        rest += [(float(v), j) for v in ordered[floors[j] :]]
    rest.sort(key=lambda item: -item[0])
    counts = dict(enumerate(floors))
    for _, j in rest[: wanted - sum(floors)]:
        counts[j] += 1
    return {j: _rounded(g, counts[j], round_to) for j, g in enumerate(groups)}


@dataclass(frozen=True)
class Allocation:
    """A mask meeting (or closest to) the budget, and what it costs."""

    mask: Tensor
    fraction: float
    macs: float
    params: float
    evaluations: int


def allocate(
    masks: ChannelMasks,
    scores: Tensor,
    budget: Budget,
    pools: Sequence[Sequence[int]],
    *,
    dense: float | None = None,
    max_evals: int = 40,
    weights: Sequence[float] | None = None,
) -> Allocation:
    """Bisect the pruned fraction whose mask meets ``budget`` on the masks' cost model.

    Args:
        masks: the groups and the cost model.
        scores: one score per position (higher is kept).
        budget: the target.
        pools: from :func:`pools_for`.
        dense: the dense cost (default: the cost with every position kept).
        max_evals: cost evaluations at most.
        weights: per-group multipliers of the pruned fraction (see :func:`mask_for_fraction`).

    Returns:
        The mask closest to the target (relative error on the reduction factor).

    Raises:
        BudgetError: even the smallest mask (every group at its floor) misses the target by
            more than the tolerance.
    """
    if dense is None:
        dense = budget.pick(*masks.cost(masks.ones()))
    target_reduction = budget.reduction
    evals = 0

    def evaluate(fraction: float) -> Allocation:
        nonlocal evals
        evals += 1
        mask = mask_for_fraction(masks, scores, pools, fraction, budget.round_to, weights)
        return Allocation(mask, fraction, *masks.cost(mask), evaluations=evals)

    def error(a: Allocation) -> float:
        return budget.error(dense, budget.pick(a.macs, a.params), target_reduction)

    top = 1.0 / max(min(weights), 1e-6) if weights is not None else 1.0  # every group at its floor
    smallest = evaluate(top)
    if not reduction_met(
        dense / max(budget.pick(smallest.macs, smallest.params), 1.0), target_reduction, budget.tolerance
    ):
        raise unreachable(budget, dense, budget.pick(smallest.macs, smallest.params))
    best, lo, hi = smallest, 0.0, top
    while evals < max_evals and error(best) > budget.tolerance / 4 and hi - lo > 1e-5:
        mid = (lo + hi) / 2
        candidate = evaluate(mid)
        best = min(best, candidate, key=error)
        if dense / max(budget.pick(candidate.macs, candidate.params), 1.0) < target_reduction:
            lo = mid
        else:
            hi = mid
    if error(best) > budget.tolerance / 4:
        mask = _refine(masks, scores, best.mask, budget, dense / target_reduction)
        refined = Allocation(mask, best.fraction, *masks.cost(mask), evaluations=evals)
        best = min(best, refined, key=error)
    return Allocation(best.mask, best.fraction, best.macs, best.params, evals)


def _refine(masks: ChannelMasks, scores: Tensor, start: Tensor, budget: Budget, target: float) -> Tensor:
    """Move a few positions at a time towards ``target`` cost when one common fraction cannot
    hit it (narrow layers change in coarse steps): add back the best removed positions of the
    groups that kept least, or remove the worst kept positions of the groups that kept most,
    and stop at the mask closest to the target."""
    step = budget.round_to or 1
    mask = start.clone()
    cost = budget.pick(*masks.cost(mask))
    grow = cost < target
    while True:
        options = []
        for g, values in masks.per_group(mask):
            kept = int(values.sum())
            if (grow and kept + step <= g.positions) or (
                not grow and kept - step >= _floor(g, budget.round_to)
            ):
                options.append((kept / g.positions, g))
        if not options:
            return mask
        _, g = min(options, key=lambda o: o[0]) if grow else max(options, key=lambda o: o[0])
        values = scores[g.span].clone()
        alive = mask[g.span] > 0
        values[alive if grow else ~alive] = float("-inf") if grow else float("inf")
        picked = torch.topk(values, step, largest=grow).indices
        trial = mask.clone()
        trial[g.offset + picked] = 1.0 if grow else 0.0
        new = budget.pick(*masks.cost(trial))
        crossed = new > target if grow else new <= target
        if crossed:
            return trial if abs(new - target) < abs(cost - target) else mask
        mask, cost = trial, new


def unreachable(budget: Budget, dense: float, smallest: float) -> BudgetError:
    """The one-line error for a budget the constraints cannot reach."""
    return BudgetError(
        f"prune.target {budget.metric}_reduction {budget.reduction:g} is out of reach: with "
        f"max_layer_pruning={budget.max_layer_pruning} and round_to={budget.round_to} the smallest "
        f"model has {dense / max(smallest, 1):.2f}x fewer {budget.metric}; lower the target or "
        "raise prune.max_layer_pruning"
    )


def check_reachable(masks: ChannelMasks, budget: Budget) -> None:
    """Raise :class:`BudgetError` before any work if the budget cannot be met at all."""
    dense = budget.pick(*masks.cost(masks.ones()))
    smallest = budget.pick(
        *masks.cost(mask_for_fraction(masks, masks.ones(), pools_for(masks, "layer"), 1.0, budget.round_to))
    )
    if not budget.met(dense, smallest):
        raise unreachable(budget, dense, smallest)
