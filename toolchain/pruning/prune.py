"""``prune_to_target``: the iterative method as one call, for scripts and notebooks.

The pipeline goes through the method registry (:func:`toolchain.pruning.methods.prune_model`)
with typed recipe sections; this wrapper builds those objects from keywords.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from toolchain.errors import UserError
from toolchain.pruning.budget import Budget, Metric
from toolchain.pruning.graph import classifier_layers
from toolchain.pruning.methods import PruneJob, PruneResult, run_method
from toolchain.pruning.methods.iterative import Iterative, StepHook
from toolchain.recipe_prune import PGD3, PruneConfig, PruneTarget
from toolchain.recipe_train import AttackConfig, TrainConfig


def prune_to_target(
    model: nn.Module,
    *,
    example_inputs: Tensor,
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
    attack: Mapping[str, Any] | None = None,
    between_steps: StepHook | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune channels with ``criterion`` until MACs (or params) shrink by the requested factor.

    Args:
        model: pruned in place; its train/eval modes are restored at the end.
        example_inputs: a batch (usually ``1xCxHxW``) that MACs are counted on.
        criterion: name in ``CRITERIA`` ("magnitude", "taylor", "adv-taylor", "random").
        macs_reduction, params_reduction: exactly one, > 1.
        steps, tolerance, round_to, max_layer_pruning: as the recipe's ``prune`` keys.
        ignored_layers: extra layers whose output channels stay (the head always does).
        importance_loader, importance_batches: data for gradient-based criteria.
        attack: PGD settings for "adv-taylor" (eps, step_size, steps, norm, random_start).
        between_steps: called as ``between_steps(model, i)`` after step ``i`` but the last.
        progress: show progress bars.

    Raises:
        UnknownNameError: unknown criterion.
        BudgetError: the budget cannot be reached even with every layer at its floor.
        UserError: bad budget or settings, missing loader, or no classifier head found.
    """
    if (macs_reduction is None) == (params_reduction is None):
        raise UserError("set exactly one of macs_reduction or params_reduction")
    metric: Metric = "macs" if macs_reduction is not None else "params"
    reduction = float(macs_reduction if macs_reduction is not None else params_reduction)  # type: ignore[arg-type]
    budget = Budget(metric, reduction, tolerance, round_to, max_layer_pruning)
    extra = list(ignored_layers or [])
    members = set(model.modules())
    if any(layer not in members for layer in extra):
        raise UserError("ignored_layers must be submodules of the model being pruned")
    heads = classifier_layers(model, example_inputs)
    if not heads and not extra:
        raise UserError("no Conv/Linear layer produces the model output; pass the head in ignored_layers")
    try:
        attack_cfg = AttackConfig.model_validate({**PGD3.model_dump(), **dict(attack or {})})
    except ValidationError as exc:
        raise UserError(f"attack settings {dict(attack or {})}: {exc.errors()[0]['msg']}") from None
    cfg = PruneConfig(
        criterion=criterion,
        target=PruneTarget(**{f"{metric}_reduction": reduction}),
        tolerance=tolerance,
        steps=steps,
        round_to=round_to,
        importance_batches=importance_batches,
        max_layer_pruning=max_layer_pruning,
        attack=attack_cfg,
        finetune_between=TrainConfig(epochs=0),
    )
    job = PruneJob(
        example_inputs=example_inputs,
        budget=budget,
        ignored_layers=heads + [m for m in extra if m not in heads],
        loader=lambda _offset: importance_loader,  # type: ignore[arg-type,return-value]
        attack=attack_cfg,
        progress=progress,
    )
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    return run_method(Iterative(cfg, between_steps=between_steps), model, job)
