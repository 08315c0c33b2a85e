"""``mrs``: per-group keep ratios from module robustness sensitivity, then adversarial fine-tuning.

MRPF (module robustness sensitivity pruning, 2024-25). Only the abstract is available: measure
each layer's sensitivity to adversarial perturbation, prune sensitive layers less (adaptive
per-layer ratios), then fine-tune adversarially with any AT method (TRADES reported); the
authors stress that adaptive ratios and fine-tuning matter more than the channel criterion.

Our design: the module robustness sensitivity of a dependency group is the rise of the
adversarial cross-entropy when that group alone loses ``probe_ratio`` of its channels (the
lowest by ``prune.criterion``), measured with masks on ``probe_batches`` batches, each
adversarial example crafted against the probed model itself (``probe_attack``). Sensitivities
are normalised to [0, 1] (negative rises count as 0); a group then loses
``scale * (1 - protection * sensitivity)`` of its channels, and the one ``scale`` is bisected on
the masks' cost model to meet the budget. Inside a group the criterion chooses the channels.
The recipe's ``finetune`` section is the adversarial fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from toolchain.pruning.budget import allocate, check_reachable, pools_for
from toolchain.pruning.criteria import CRITERIA
from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome, PruningMethod
from toolchain.pruning.methods.iterative import position_scores
from toolchain.pruning.methods.probe import adversarial_loss, take
from toolchain.pruning.scores import compute_scores
from toolchain.recipe_prune import PGD3, MethodSection
from toolchain.recipe_train import AttackConfig


def masked_loss(
    model: nn.Module,
    masks: ChannelMasks,
    mask: Tensor,
    batches: list[tuple[Tensor, Tensor]],
    attack: AttackConfig,
) -> float:
    """:func:`adversarial_loss` of the model with ``mask`` applied (attacks see the mask too)."""
    with masks.attached(lambda: mask):
        return adversarial_loss(model, batches, attack)


class MrsConfig(MethodSection):
    """MRPF's module robustness sensitivity (our design from the abstract).

    Each group is probed by removing ``probe_ratio`` of its channels (lowest by
    ``prune.criterion``) and measuring the rise of the adversarial loss (``probe_attack``
    crafted against the probed model, on ``probe_batches`` batches). The most sensitive group
    then loses ``1 - protection`` times the fraction the least sensitive one loses; one common
    scale is bisected to meet the budget. Adversarial fine-tuning is the recipe's ``finetune``.
    """

    probe_ratio: float = Field(
        0.3, gt=0, lt=1, description="fraction of a group's channels removed to probe it"
    )
    probe_batches: int = Field(2, ge=1, description="batches the adversarial loss is measured on")
    probe_attack: AttackConfig = PGD3
    protection: float = Field(0.8, ge=0, lt=1, description="how much the most sensitive group is spared")


@METHODS.register("mrs")
class Mrs(PruningMethod):
    """Sensitive groups keep more channels; the criterion picks which inside each group."""

    name = "mrs"
    prune_keys = frozenset({"criterion", "importance_batches", "attack"})
    settings = MrsConfig
    uses_masks = True
    description = "MRPF: per-group keep ratios from adversarial-loss sensitivity, then fine-tune"

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: MrsConfig = self.own
        cfg = self.cfg
        x = job.example_inputs
        masks = ChannelMasks(model, x, job.ignored_layers, max_layer_pruning=job.budget.max_layer_pruning)
        check_reachable(masks, job.budget)
        needs_grad = CRITERIA.get(cfg.criterion).needs_gradients
        table = compute_scores(
            model,
            x,
            cfg.criterion,
            ignored_layers=job.ignored_layers,
            loader=job.loader(1) if needs_grad else None,
            batches=cfg.importance_batches,
            attack=job.attack,
        )
        scores, unscored = position_scores(masks, table)
        batches = take(job.loader(5), own.probe_batches)
        base = masked_loss(model, masks, masks.ones(), batches, own.probe_attack)
        rises = []
        for i, group in enumerate(masks.groups):
            if i in unscored:
                rises.append(0.0)
                continue
            probe = masks.ones()
            drop = max(1, min(round(own.probe_ratio * group.positions), group.positions - group.floor))
            weakest = torch.topk(scores[group.span], drop, largest=False).indices
            probe[group.offset + weakest] = 0.0
            rises.append(masked_loss(model, masks, probe, batches, own.probe_attack) - base)
        top = max(max(rises), 1e-12)
        sensitivity = [max(r, 0.0) / top for r in rises]
        weights = [1.0 - own.protection * s for s in sensitivity]
        chosen = allocate(
            masks, scores, job.budget, pools_for(masks, "layer", exclude=unscored), weights=weights
        )
        groups: dict[str, dict[str, Any]] = {}
        for (group, kept), rise, s in zip(masks.per_group(chosen.mask), rises, sensitivity):
            groups[group.root] = {
                "loss_rise": rise,
                "sensitivity": s,
                "keep_ratio": float(kept.sum()) / group.positions,
                "channels": group.size,
            }
        history = masks.remove(chosen.mask)
        info = {"criterion": cfg.criterion, "base_adversarial_loss": base, "groups": groups}
        return PruneOutcome(model, history, [], info)
