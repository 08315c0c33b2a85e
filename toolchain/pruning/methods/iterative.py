"""``iterative``: score channels with a criterion, remove them, fine-tune, repeat.

The classic structured-pruning loop (Molchanov et al. 2017/2019; torch-pruning's
``MetaPruner``), with our budget search: step ``i`` of ``steps`` rescores the current model
with the criterion (``magnitude``, ``taylor``, ``adv-taylor``, ``random``), finds on the
channel masks' cost model the uniform ratio (refined a few channels at a time for narrow
layers) whose mask is closest to ``dense / reduction ** (i / steps)`` MACs (or params),
removes those channels physically, and recovers with ``finetune_between`` before the next step.
The classifier head is never pruned; no group goes below ``max_layer_pruning`` of its dense
width.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from toolchain.errors import UserError
from toolchain.pruning.budget import allocate, check_reachable, pools_for
from toolchain.pruning.criteria import CRITERIA
from toolchain.pruning.graph import HistoryEntry, count_macs_params
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome, PruningMethod
from toolchain.pruning.scores import ScoreTable, compute_scores
from toolchain.recipe_prune import ITERATIVE_KEYS
from toolchain.recipe_train import AttackConfig
from toolchain.training import train_model

logger = logging.getLogger(__name__)

#: ``between_steps(model, step)`` runs after every step but the last (1-based step).
StepHook = Callable[[nn.Module, int], None]


@METHODS.register("iterative")
class Iterative(PruningMethod):
    """Criterion scores, budget search and physical removal, in ``prune.steps`` steps."""

    name = "iterative"
    prune_keys = ITERATIVE_KEYS
    description = "score with prune.criterion, remove, fine-tune; repeated prune.steps times"

    def __init__(self, cfg: Any, between_steps: StepHook | None = None) -> None:
        super().__init__(cfg)
        self.between_steps = between_steps

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        cfg = self.cfg
        hook = self.between_steps or self._finetune_between(job)
        loader = job.loader(1) if CRITERIA.get(cfg.criterion).needs_gradients else None
        history, steps = iterative_prune(
            model,
            job,
            criterion=cfg.criterion,
            steps=cfg.steps,
            loader=loader,
            importance_batches=cfg.importance_batches,
            attack=job.attack,
            between_steps=hook,
        )
        return PruneOutcome(model, history, steps, {"criterion": cfg.criterion})

    def _finetune_between(self, job: PruneJob) -> StepHook | None:
        settings = self.cfg.finetune_between
        if settings.epochs == 0:
            return None

        def recover(model: nn.Module, step: int) -> None:
            train_model(
                model,
                job.loader(1 + step),
                settings,
                seed=job.seed + step,
                desc=f"recover {step}",
                section="prune.finetune_between",
                progress=job.progress,
                device=job.device,
                teacher=job.teacher,
            )
            model.cpu()  # the next step traces and prunes on the CPU

        return recover


def iterative_prune(
    model: nn.Module,
    job: PruneJob,
    *,
    criterion: str,
    steps: int,
    loader: Iterable[tuple[Tensor, Tensor]] | None,
    importance_batches: int,
    attack: AttackConfig | None,
    between_steps: StepHook | None,
) -> tuple[list[HistoryEntry], list[dict[str, Any]]]:
    """The loop itself (see the module docstring); ``model`` is pruned in place.

    Returns:
        The torch-pruning history of all steps and one record per step.

    Raises:
        UnknownNameError: unknown criterion.
        BudgetError: the budget is out of reach even with every group at its floor.
        UserError: a gradient-based criterion without a loader.
    """
    info = CRITERIA.get(criterion)
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if info.needs_gradients and loader is None:
        raise UserError(f"criterion {criterion!r} needs gradients: pass importance_loader")
    budget, x, ignored = job.budget, job.example_inputs, job.ignored_layers
    masks = ChannelMasks(model, x, ignored, max_layer_pruning=budget.max_layer_pruning, strict=False)
    check_reachable(masks, budget)
    # Floors are fractions of the *dense* widths, whatever earlier steps removed.
    floors = {g.root: g.floor * g.ch_groups for g in masks.groups}
    logger.info("pruning with %r; head(s) kept: %s", criterion, ", ".join(_names(model, ignored)))
    modes = [(m, m.training) for m in model.modules()]
    dense_macs, dense_params = (int(v) for v in masks.cost(masks.ones()))
    dense = budget.pick(dense_macs, dense_params)
    history: list[HistoryEntry] = []
    records: list[dict[str, Any]] = []
    show = job.progress and steps > 1
    for i in tqdm(range(1, steps + 1), desc=f"prune {criterion}", disable=None if show else True):
        started = time.perf_counter()
        step = replace(budget, reduction=budget.reduction ** (i / steps))
        if i > 1:
            masks = ChannelMasks(model, x, ignored, strict=False, floors=floors)
        table = compute_scores(
            model,
            x,
            criterion,
            ignored_layers=ignored,
            loader=loader,
            batches=importance_batches,
            attack=attack,
        )
        scores, unscored = position_scores(masks, table)
        scored = time.perf_counter()
        chosen = allocate(masks, scores, step, pools_for(masks, "layer", exclude=unscored), dense=dense)
        history += masks.remove(chosen.mask)
        macs, params = count_macs_params(model, x)
        records.append(
            {
                "step": i,
                "target_reduction": step.reduction,
                f"target_{budget.metric}": round(dense / step.reduction),
                "ratio": chosen.fraction,
                "macs": macs,
                "params": params,
                "macs_reduction": dense_macs / macs,
                "params_reduction": dense_params / params,
                "evaluations": chosen.evaluations,
                "score_seconds": scored - started,
                "seconds": time.perf_counter() - started,
            }
        )
        logger.info(
            "step %d/%d: ratio %.4f -> %d MACs, %d params (%s reduction %.3f, target %.3f)",
            i,
            steps,
            chosen.fraction,
            macs,
            params,
            budget.metric,
            dense / budget.pick(macs, params),
            step.reduction,
        )
        if between_steps is not None and i < steps:
            between_steps(model, i)
    for module, training in modes:
        module.training = training
    return history, records


def _names(model: nn.Module, layers: Iterable[nn.Module]) -> list[str]:
    names = {module: name for name, module in model.named_modules()}
    return [names[m] for m in layers]


def position_scores(masks: ChannelMasks, table: ScoreTable) -> tuple[Tensor, frozenset[int]]:
    """The criterion's channel scores per mask position (mean over tied channel groups), and
    the groups the criterion could not score (they keep every channel)."""
    scores = torch.zeros(masks.total)
    unscored = set()
    for i, group in enumerate(masks.groups):
        channel = table.get(group.key)
        if channel is None or len(channel) != group.size:
            unscored.add(i)
            continue
        scores[group.span] = channel.float().view(group.ch_groups, group.positions).mean(0)
    return scores, frozenset(unscored)
