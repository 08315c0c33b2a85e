"""What the methods that train through channel masks share: setup, scores, training, removal."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from toolchain.pruning.budget import Allocation, allocate, check_reachable, pools_for
from toolchain.pruning.graph import HistoryEntry, count_macs_params
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import PruneJob, PruningMethod
from toolchain.pruning.scores import compute_scores
from toolchain.recipe_train import TrainConfig
from toolchain.training import TrainHooks, train_model

logger = logging.getLogger(__name__)


class MaskedMethod(PruningMethod):
    """Base of methods that train a dense model with masks and remove channels at the end."""

    trains: ClassVar[bool] = True
    uses_masks: ClassVar[bool] = True

    def masks(self, model: nn.Module, job: PruneJob) -> ChannelMasks:
        """Masks over ``model``'s groups; raises before any training if the budget is out of reach."""
        masks = ChannelMasks(
            model, job.example_inputs, job.ignored_layers, max_layer_pruning=job.budget.max_layer_pruning
        )
        check_reachable(masks, job.budget)
        return masks

    def allocate(self, masks: ChannelMasks, scores: Tensor, job: PruneJob, allocation: str) -> Allocation:
        """The mask of the top ``scores`` that meets the budget (see :func:`allocate`)."""
        block_depth = getattr(self.own, "block_depth", 3)
        return allocate(masks, scores, job.budget, pools_for(masks, allocation, block_depth))

    def train(
        self, model: nn.Module, job: PruneJob, hooks: TrainHooks, cfg: TrainConfig | None = None
    ) -> list[dict[str, Any]]:
        """The method's in-the-loop training (its ``train`` section) with ``hooks``, on
        ``job.device``; the model comes back to the CPU, where masks and pruning work."""
        try:
            return train_model(
                model,
                job.loader(3),
                cfg or self.own.train,
                seed=job.seed + 3,
                desc=self.name,
                section=f"prune.{self.name}.train" if cfg is None else "prune",
                progress=job.progress,
                device=job.device,
                hooks=hooks,
                checkpoint=job.checkpoint,
                teacher=job.teacher,
            )
        finally:
            model.cpu()

    def remove(
        self, model: nn.Module, masks: ChannelMasks, mask: Tensor, job: PruneJob
    ) -> list[HistoryEntry]:
        """Physically remove what ``mask`` zeroes; the exact count must match the cost model."""
        predicted = masks.cost(mask)
        history = masks.remove(mask)
        actual = count_macs_params(model, job.example_inputs)
        if abs(actual[0] - predicted[0]) > 0.5 or abs(actual[1] - predicted[1]) > 0.5:
            logger.warning(
                "%s: pruned model has %d MACs / %d params, the mask predicted %.0f / %.0f",
                self.name,
                *actual,
                *predicted,
            )
        return history


def magnitude_positions(model: nn.Module, masks: ChannelMasks, job: PruneJob) -> Tensor:
    """The magnitude criterion per position (L2 norm over coupled layers, mean over tied groups)."""
    # During training the model may live on the GPU: trace it with inputs where it is.
    example = job.example_inputs.to(next(model.parameters()).device)
    table = compute_scores(model, example, "magnitude", ignored_layers=job.ignored_layers)
    scores = torch.zeros(masks.total)
    for group in masks.groups:
        channel = table[group.key].float()
        scores[group.span] = channel.view(group.ch_groups, group.positions).mean(0)
    return scores


def root_fan_in(model: nn.Module, masks: ChannelMasks) -> Tensor:
    """Per position, the fan-in of its group's root layer (``in / groups * kernel``)."""
    modules = dict(model.named_modules())
    fan = torch.ones(masks.total)
    for group in masks.groups:
        weight = modules[group.root].weight  # type: ignore[union-attr]
        assert isinstance(weight, Tensor)
        fan[group.span] = float(weight[0].numel())
    return fan


def group_topk(values: Tensor, masks: ChannelMasks, keep: dict[int, int]) -> Tensor:
    """0/1 mask keeping, in group ``i``, the ``keep[i]`` positions with the largest values."""
    hard = torch.zeros_like(values)
    for i, group in enumerate(masks.groups):
        top = torch.topk(values[group.span], keep[i]).indices
        hard[group.offset + top] = 1.0
    return hard


def keep_counts(masks: ChannelMasks, mask: Tensor) -> dict[int, int]:
    """Positions kept per group (by group index) in a 0/1 mask."""
    return {i: int(mask[g.span].sum()) for i, g in enumerate(masks.groups)}
