"""``prune_to_target``: score, search the ratio, remove channels; repeat over iterative steps."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from toolchain.errors import UserError
from toolchain.pruning.criteria import CRITERIA
from toolchain.pruning.graph import (
    HistoryEntry,
    classifier_layers,
    count_macs_params,
    out_channels,
)
from toolchain.pruning.scores import compute_scores
from toolchain.pruning.search import prune_groups, search_ratio

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What pruning did.

    Attributes:
        model: the model passed in, physically pruned in place.
        history: JSON-serialisable torch-pruning history (all steps, in order); replaying it
            on a fresh dense model with ``load_pruned`` rebuilds the architecture.
        dense_macs, dense_params, macs, params: sizes before and after.
        macs_reduction, params_reduction: ``dense / pruned`` factors (4.0 = a quarter left).
        steps: one dict per iterative step (target, ratio found, macs, params, timing).
    """

    model: nn.Module
    history: list[HistoryEntry]
    dense_macs: int
    dense_params: int
    macs: int
    params: int
    macs_reduction: float
    params_reduction: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def _validate(
    model: nn.Module,
    macs_reduction: float | None,
    params_reduction: float | None,
    steps: int,
    tolerance: float,
    round_to: int | None,
    max_layer_pruning: float,
    ignored_layers: Sequence[nn.Module],
) -> tuple[str, float]:
    if (macs_reduction is None) == (params_reduction is None):
        raise UserError("set exactly one of macs_reduction or params_reduction")
    metric, reduction = (
        ("macs", macs_reduction) if macs_reduction is not None else ("params", params_reduction)
    )
    if reduction is None or not reduction > 1.0:
        raise UserError(f"{metric}_reduction must be > 1 (4.0 keeps a quarter), got {reduction}")
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if not 0.0 < tolerance < 1.0:
        raise UserError(f"tolerance must be in (0, 1), got {tolerance}")
    if round_to is not None and round_to < 1:
        raise UserError(f"round_to must be >= 1 or None, got {round_to}")
    if not 0.0 < max_layer_pruning < 1.0:
        raise UserError(f"max_layer_pruning must be in (0, 1), got {max_layer_pruning}")
    members = set(model.modules())
    if any(layer not in members for layer in ignored_layers):
        raise UserError("ignored_layers must be submodules of the model being pruned")
    return metric, float(reduction)


def prune_to_target(
    model: nn.Module,
    *,
    example_inputs: Any,
    criterion: str,
    macs_reduction: float | None = None,
    params_reduction: float | None = None,
    steps: int = 1,
    tolerance: float = 0.05,
    round_to: int | None = None,
    max_layer_pruning: float = 0.9,
    ignored_layers: Sequence[nn.Module] | None = None,
    importance_loader: Iterable[tuple[Tensor, Tensor]] | None = None,
    importance_batches: int = 4,
    attack: dict[str, Any] | None = None,
    between_steps: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune channels until MACs (or params) shrink by the requested factor.

    Step ``i`` of ``steps`` rescores the current model, then bisects the channel ratio whose
    result is closest to ``dense / reduction ** (i / steps)`` and removes those channels;
    ``between_steps(model, i)`` runs after every step but the last (the pipeline fine-tunes
    there). The classifier head (see :func:`classifier_layers`) is never pruned.

    Args:
        model: pruned in place; its train/eval modes are restored at the end.
        example_inputs: a batch (usually ``1xCxHxW``) that MACs are counted on.
        criterion: name in ``CRITERIA`` ("magnitude", "taylor", "adv-taylor", "random").
        macs_reduction, params_reduction: exactly one, > 1.
        steps: iterative steps.
        tolerance: allowed ``|achieved / target - 1|`` on the reduction factor.
        round_to: keep channel counts multiples of this (GPU-friendly); may make the target
            unreachable, then the closest result is kept and a warning logged.
        max_layer_pruning: never remove more than this fraction of any layer's dense width.
        ignored_layers: extra layers whose output channels stay.
        importance_loader, importance_batches: data for gradient-based criteria.
        attack: ``pgd_attack`` settings for "adv-taylor" (eps, step_size, steps, norm,
            random_start); defaults to PGD-3 at 8/255.
        between_steps: hook called as ``between_steps(model, i)`` after step ``i`` (1-based).
        progress: show tqdm bars.

    Returns:
        A :class:`PruneResult` with the achieved numbers and the history.

    Raises:
        UnknownNameError: unknown criterion.
        UserError: bad budget or settings, missing loader, or no classifier head found.
    """
    info = CRITERIA.get(criterion)
    extra_ignored = list(ignored_layers or [])
    metric, reduction = _validate(
        model, macs_reduction, params_reduction, steps, tolerance, round_to, max_layer_pruning, extra_ignored
    )
    if info.needs_gradients and importance_loader is None:
        raise UserError(f"criterion {criterion!r} needs gradients: pass importance_loader")
    heads = classifier_layers(model, example_inputs)
    if not heads and not extra_ignored:
        raise UserError("no Conv/Linear layer produces the model output; pass the head in ignored_layers")
    ignored = heads + [m for m in extra_ignored if m not in heads]
    names = {module: name for name, module in model.named_modules()}
    ignored_names = [names[m] for m in ignored]
    logger.info("pruning with %r; head(s) kept: %s", criterion, ", ".join(ignored_names))

    modes = [(m, m.training) for m in model.modules()]
    dense_macs, dense_params = count_macs_params(model, example_inputs)
    dense = dense_macs if metric == "macs" else dense_params
    floors = {
        name: max(1, math.ceil(width * (1.0 - max_layer_pruning) - 1e-9))
        for name, width in out_channels(model, skip=ignored).items()
    }
    history: list[HistoryEntry] = []
    records: list[dict[str, Any]] = []
    for i in tqdm(
        range(1, steps + 1), desc=f"prune {criterion}", disable=None if progress and steps > 1 else True
    ):
        started = time.perf_counter()
        step_reduction = reduction ** (i / steps)
        target = dense / step_reduction
        table = compute_scores(
            model,
            example_inputs,
            criterion,
            ignored_layers=ignored,
            loader=importance_loader,
            batches=importance_batches,
            attack=attack,
        )
        scored = time.perf_counter()
        best, evals = search_ratio(
            model,
            example_inputs,
            table,
            metric=metric,
            target=target,
            floors=floors,
            round_to=round_to,
            ignored_names=ignored_names,
            tolerance=tolerance,
            progress=progress,
            desc=f"step {i}/{steps} ratio search",
        )
        searched = time.perf_counter()
        history += prune_groups(
            model, example_inputs, table, best.ratio, floors=floors, round_to=round_to, ignored_layers=ignored
        )
        macs, params = count_macs_params(model, example_inputs)
        if (macs, params) != (best.macs, best.params):  # the copy and the model must agree
            logger.warning(
                "step %d: pruned model (%d MACs) differs from its search copy (%d)", i, macs, best.macs
            )
        records.append(
            {
                "step": i,
                "target_reduction": step_reduction,
                f"target_{metric}": round(target),
                "ratio": best.ratio,
                "macs": macs,
                "params": params,
                "macs_reduction": dense_macs / macs,
                "params_reduction": dense_params / params,
                "evaluations": evals,
                "score_seconds": scored - started,
                "search_seconds": searched - scored,
                "seconds": time.perf_counter() - started,
            }
        )
        logger.info(
            "step %d/%d: ratio %.4f -> %d MACs, %d params (%s reduction %.3f, target %.3f; search %.1fs)",
            i,
            steps,
            best.ratio,
            macs,
            params,
            metric,
            dense / (macs if metric == "macs" else params),
            step_reduction,
            searched - scored,
        )
        if between_steps is not None and i < steps:
            between_steps(model, i)
    for module, training in modes:
        module.training = training

    macs, params = count_macs_params(model, example_inputs)
    achieved = dense / (macs if metric == "macs" else params)
    if abs(achieved / reduction - 1.0) > tolerance:
        logger.warning(
            "%s reduction %.3f misses the target %.3f by more than %.0f%% (round_to=%s, "
            "max_layer_pruning=%s); keeping the closest result",
            metric,
            achieved,
            reduction,
            tolerance * 100,
            round_to,
            max_layer_pruning,
        )
    return PruneResult(
        model=model,
        history=history,
        dense_macs=dense_macs,
        dense_params=dense_params,
        macs=macs,
        params=params,
        macs_reduction=dense_macs / macs,
        params_reduction=dense_params / params,
        steps=records,
    )
