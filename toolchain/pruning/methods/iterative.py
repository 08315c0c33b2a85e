"""``iterative``: score channels with a criterion, remove them, fine-tune, repeat.

The classic structured-pruning loop (Molchanov et al. 2017/2019; torch-pruning's
``MetaPruner``), with our budget search: step ``i`` of ``steps`` rescores the current model
with the criterion (``magnitude``, ``taylor``, ``adv-taylor``, ``random``), bisects the channel
ratio whose pruned copy is closest to ``dense / reduction ** (i / steps)`` MACs (or params),
removes those channels physically, and recovers with ``finetune_between`` before the next step.
The classifier head is never pruned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from toolchain.errors import UserError
from toolchain.pruning.budget import check_reachable
from toolchain.pruning.criteria import CRITERIA
from toolchain.pruning.graph import HistoryEntry, count_macs_params, out_channels
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome, PruningMethod
from toolchain.pruning.scores import compute_scores
from toolchain.pruning.search import prune_groups, search_ratio
from toolchain.recipe_train import AttackConfig
from toolchain.training import train_model

logger = logging.getLogger(__name__)

#: ``between_steps(model, step)`` runs after every step but the last (1-based step).
StepHook = Callable[[nn.Module, int], None]


@METHODS.register("iterative")
class Iterative(PruningMethod):
    """Criterion scores, budget search and physical removal, in ``prune.steps`` steps."""

    name = "iterative"
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
                progress=job.progress,
                device=job.device,
            )

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
    budget, x = job.budget, job.example_inputs
    ignored = job.ignored_layers
    masks = ChannelMasks(model, x, ignored, max_layer_pruning=budget.max_layer_pruning, strict=False)
    check_reachable(masks, budget)
    names = {module: name for name, module in model.named_modules()}
    ignored_names = [names[m] for m in ignored]
    logger.info("pruning with %r; head(s) kept: %s", criterion, ", ".join(ignored_names))

    modes = [(m, m.training) for m in model.modules()]
    dense_macs, dense_params = count_macs_params(model, x)
    dense = budget.pick(dense_macs, dense_params)
    floors = {
        name: max(1, math.ceil(width * (1.0 - budget.max_layer_pruning) - 1e-9))
        for name, width in out_channels(model, skip=ignored).items()
    }
    history: list[HistoryEntry] = []
    records: list[dict[str, Any]] = []
    show = job.progress and steps > 1
    for i in tqdm(range(1, steps + 1), desc=f"prune {criterion}", disable=None if show else True):
        started = time.perf_counter()
        step_reduction = budget.reduction ** (i / steps)
        target = dense / step_reduction
        table = compute_scores(
            model,
            x,
            criterion,
            ignored_layers=ignored,
            loader=loader,
            batches=importance_batches,
            attack=attack,
        )
        scored = time.perf_counter()
        best, evals = search_ratio(
            model,
            x,
            table,
            metric=budget.metric,
            target=target,
            floors=floors,
            round_to=budget.round_to,
            ignored_names=ignored_names,
            tolerance=budget.tolerance,
            progress=job.progress,
            desc=f"step {i}/{steps} ratio search",
        )
        searched = time.perf_counter()
        history += prune_groups(
            model, x, table, best.ratio, floors=floors, round_to=budget.round_to, ignored_layers=ignored
        )
        macs, params = count_macs_params(model, x)
        records.append(
            {
                "step": i,
                "target_reduction": step_reduction,
                f"target_{budget.metric}": round(target),
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
            "step %d/%d: ratio %.4f -> %d MACs, %d params (%s reduction %.3f, target %.3f)",
            i,
            steps,
            best.ratio,
            macs,
            params,
            budget.metric,
            dense / budget.pick(macs, params),
            step_reduction,
        )
        if between_steps is not None and i < steps:
            between_steps(model, i)
    for module, training in modes:
        module.training = training
    return history, records
