"""``hydra``: learn which channels to keep by training importance scores under a robust loss.

Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020; official
code github.com/inspire-group/hydra (read for this implementation, not copied).

What follows the paper and its code:

* one importance score per prunable unit, initialised from the weights' magnitude scaled as
  ``sqrt(6 / fan_in) * |w| / max |w|`` (``--scaled-score-init``), so the search starts from the
  magnitude mask;
* the forward pass keeps the top-k units by ``|score|`` per layer (``GetSubnet``), and the
  gradient passes straight through the top-k to the scores;
* prune phase: weights and biases of convolutions and linear layers frozen, scores trained
  under the robust loss (TRADES, beta 6) with SGD, momentum 0.9, weight decay on the scores,
  cosine learning rate; BatchNorm affine parameters keep training unless ``train_bn: false``;
* then the kept weights are fine-tuned (here: the recipe's ``finetune`` stage, after the
  channels are physically removed).

What is ours: HYDRA is unstructured (a score per weight). Here a score belongs to a *channel*
of a torch-pruning dependency group (coupled layers share it) and masks multiply the inputs
of the layers consuming it; the magnitude behind the initial score is torch-pruning's group L2
norm (all coupled layers), and the per-layer ``k`` is the keep count of each group under the
MACs budget (``allocation: layer``, HYDRA's same-ratio-everywhere), fixed before training.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome
from toolchain.pruning.methods.masked import (
    MaskedMethod,
    group_topk,
    keep_counts,
    magnitude_positions,
    root_fan_in,
)
from toolchain.recipe_prune import PGD3, Allocation, TrainingSection
from toolchain.recipe_train import TrainConfig
from toolchain.training import TrainHooks


def scaled_scores(magnitude: Tensor, fan_in: Tensor, masks: Any) -> Tensor:
    """HYDRA's scaled initialisation, per group: ``sqrt(6 / fan_in) * m / max(m)``."""
    scores = torch.zeros_like(magnitude)
    for group in masks.groups:
        m = magnitude[group.span]
        scores[group.span] = (6.0 / fan_in[group.span]).sqrt() * m / m.max().clamp_min(1e-12)
    return scores


def _copy(target: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        target.copy_(value)


class HydraConfig(TrainingSection):
    """HYDRA (Sehwag et al. 2020): train one importance score per channel, weights frozen.

    ``train`` is the score-training phase: its ``lr`` is the scores' learning rate (no weight
    decay on scores), its ``loss`` the robust loss (TRADES in the paper). The kept weights are
    fine-tuned afterwards by the recipe's ``finetune`` section.
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.1, loss="trades", weight_decay=1e-4, attack=PGD3)
    train_bn: bool = Field(True, description="BatchNorm affine parameters train with the scores")
    allocation: Allocation = Field("layer", description="how the budget is split among groups")


@METHODS.register("hydra")
class Hydra(MaskedMethod):
    """Channel scores trained with frozen weights under TRADES; top-k per group kept."""

    name = "hydra"
    settings = HydraConfig
    description = "HYDRA: train channel importance scores under a robust loss, weights frozen"

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: HydraConfig = self.own
        masks = self.masks(model, job)
        initial = scaled_scores(magnitude_positions(model, masks, job), root_fan_in(model, masks), masks)
        start = self.allocate(masks, initial, job, own.allocation)
        keep = keep_counts(masks, start.mask)
        scores = nn.Parameter(initial.clone())

        def mask() -> Tensor:
            # Straight-through: the forward sees the hard top-k, the scores get its gradient.
            hard = group_topk(scores.detach().abs(), masks, keep)
            return hard + scores - scores.detach()

        frozen = [
            p
            for m in model.modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            for p in m.parameters(recurse=False)
        ]
        bn = [
            p
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)
        ]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        for p in bn:
            p.requires_grad_(own.train_bn)

        def groups(_model: nn.Module) -> list[dict[str, Any]]:
            trainable = [{"params": [scores]}]
            return trainable + ([{"params": bn}] if own.train_bn and bn else [])

        def moved() -> dict[str, float]:
            now = group_topk(scores.detach().abs(), masks, keep)
            return {"changed_positions": float((now != start.mask).sum())}

        try:
            with masks.attached(mask):
                hooks = TrainHooks(
                    param_groups=groups,
                    metrics=moved,
                    state=lambda: {"scores": scores.detach().clone()},
                    load_state=lambda saved: _copy(scores, saved["scores"]),
                )
                epochs = self.train(model, job, hooks)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        final = group_topk(scores.detach().abs(), masks, keep)
        info = {
            "kept_positions": int(final.sum()),
            "positions": masks.total,
            "changed_from_magnitude": int((final != start.mask).sum()) // 2,
            "score_change": float((scores.detach() - initial).abs().mean()),
        }
        history = self.remove(model, masks, final, job)
        return PruneOutcome(model, history, epochs, info)
