"""``dnr``: one training run at the budget, periodically dropping and regrowing channels.

Kundu et al., "DNR: A Tunable Robust Pruning Framework Through Dynamic Network Rewiring of
DNNs", ASP-DAC 2021. Only the abstract and the released evaluation code are available (no
training code), so the procedure below is our reconstruction from the abstract and from the
sparse-momentum method it builds on (Dettmers & Zettlemoyer 2019, official code
github.com/TimDettmers/sparse_learning, read for this, not copied):

* from the abstract: a single training run reaches the target; a hybrid loss merges
  adversarial training with the compression objective (here ``0.5 * CE(x) + 0.5 * CE(x_adv)``
  plus weight decay, ``train.loss: hybrid``); per-layer normalised momentum decides where
  connectivity goes; channel granularity is supported;
* from sparse momentum: the drop rate decays on a cosine from ``drop_fraction``; each update
  removes that fraction of every layer's live units with the smallest magnitude; each layer's
  share of the regrowth is its mean momentum magnitude over its live units, normalised across
  layers; within a layer the dead units with the largest momentum come back; regrown units
  keep their last weights, and the momentum is not reset.

What is ours: units are channels of torch-pruning dependency groups (magnitude = group L2
norm). A dead channel has no weight gradient (its consumers see zeros), so "momentum" is the
exponential moving average of the gradient of the loss with respect to the channel's mask
value: for a live channel its first-order importance, for a dead one the first-order gain of
reviving it. The budget is MACs, not a weight count, so regrowth continues in proportion to
the layer shares until the masked model reaches the MACs target again: every rewiring ends at
the budget. The starting mask is the magnitude mask at the budget; after ``rewire_until`` the
mask is fixed and training continues as fine-tuning, so no separate fine-tune is needed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome
from toolchain.pruning.methods.masked import MaskedMethod, magnitude_positions
from toolchain.recipe_prune import PGD3, Allocation, TrainingSection
from toolchain.recipe_train import TrainConfig
from toolchain.training import Step, TrainHooks

MIN_DROP = 0.005  # sparse momentum's floor of the cosine-decayed prune rate


def drop_rate(initial: float, progress: float) -> float:
    """Cosine decay from ``initial`` to 0.005 over the run (sparse momentum's ``CosineDecay``)."""
    return MIN_DROP + (initial - MIN_DROP) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def layer_shares(masks: ChannelMasks, mask: Tensor, momentum: Tensor) -> list[float]:
    """Each group's mean |momentum| over its live positions, normalised to sum to 1."""
    means = []
    for group, live in masks.per_group(mask):
        values = momentum[group.span].abs()[live > 0]
        means.append(float(values.mean()) if len(values) else 0.0)
    total = sum(means)
    return [m / total for m in means] if total > 0 else [1 / len(means)] * len(means)


def rewire(
    masks: ChannelMasks,
    mask: Tensor,
    magnitude: Tensor,
    momentum: Tensor,
    rate: float,
    target: float,
    metric: str,
) -> tuple[Tensor, list[int], list[int]]:
    """Drop ``rate`` of each group's live positions by magnitude, then regrow by momentum
    until the cost is back at ``target``.

    Returns:
        The new mask, the positions dropped and the positions regrown (flat indices).
    """
    shares = layer_shares(masks, mask, momentum)
    new = mask.clone()
    dropped: list[int] = []
    for group, live in masks.per_group(mask):
        alive = torch.nonzero(live > 0).flatten()
        n = min(math.ceil(rate * len(alive)), len(alive) - group.floor)
        if n <= 0:
            continue
        weakest = alive[torch.argsort(magnitude[group.span][alive])[:n]]
        new[group.offset + weakest] = 0.0
        dropped += (group.offset + weakest).tolist()
    # Candidates per group, best momentum first; groups take turns in proportion to their share.
    queues = []
    for group, live in masks.per_group(new):
        dead = torch.nonzero(live == 0).flatten()
        order = dead[torch.argsort(momentum[group.span][dead].abs(), descending=True)]
        queues.append([group.offset + int(p) for p in order])
    granted = [0] * len(queues)
    quota = [max(s, 1e-9) for s in shares]
    regrown: list[int] = []
    index = 0 if metric == "macs" else 1
    while True:
        open_groups = [i for i, q in enumerate(queues) if granted[i] < len(q)]
        if not open_groups:
            break
        i = min(open_groups, key=lambda j: (granted[j] + 1) / quota[j])
        position = queues[i][granted[i]]
        new[position] = 1.0
        if masks.cost(new)[index] > target:
            new[position] = 0.0
            queues[i] = queues[i][: granted[i]]  # this group's next channel no longer fits
            continue
        granted[i] += 1
        regrown.append(position)
    return new, dropped, regrown


class DnrConfig(TrainingSection):
    """DNR (Kundu et al. 2021): one training run to the budget, dropping and regrowing channels.

    Every ``update_every`` steps until ``rewire_until`` (fraction of the steps), each group
    drops ``drop_fraction`` (cosine-decayed) of its live channels with the smallest weight
    norm; the freed budget is regrown where the momentum of the mask gradient is largest,
    layers sharing in proportion to their normalised mean momentum. No fine-tune phase is
    needed after it (set the recipe's ``finetune.epochs`` to 0 to spend the budget here).
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.02, loss="hybrid", attack=PGD3)
    update_every: int = Field(20, ge=1, description="steps between rewiring")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="fraction of live channels dropped at first")
    rewire_until: float = Field(0.75, gt=0, le=1, description="fraction of steps; the mask is fixed after")
    momentum: float = Field(0.9, ge=0, lt=1, description="decay of the mask-gradient momentum")
    allocation: Allocation = Field("layer", description="the starting mask's split of the budget")


@METHODS.register("dnr")
class Dnr(MaskedMethod):
    """Train at the budget with a hybrid loss; drop by magnitude, regrow by momentum."""

    name = "dnr"
    settings = DnrConfig
    description = "DNR: one run at the budget, channels dropped by norm and regrown by momentum"

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: DnrConfig = self.own
        masks = self.masks(model, job)
        budget = job.budget
        dense = budget.pick(*masks.cost(masks.ones()))
        target = dense / budget.reduction
        start = self.allocate(masks, magnitude_positions(model, masks, job), job, own.allocation)
        mask = start.mask.clone().requires_grad_(True)
        momentum = torch.zeros(masks.total)
        ever_dropped: set[int] = set()
        updates: list[dict[str, Any]] = []

        def after_step(state: Step) -> None:
            nonlocal mask, momentum
            if mask.grad is not None:
                momentum = own.momentum * momentum + (1 - own.momentum) * mask.grad.detach().cpu()
                mask.grad = None
            progress = (state.step + 1) / state.total
            if (state.step + 1) % own.update_every or progress > own.rewire_until:
                return
            rate = drop_rate(own.drop_fraction, progress)
            masks.detach()  # score the plain model: tracing must not see the mask hooks
            magnitude = magnitude_positions(model, masks, job)
            new, dropped, regrown = rewire(
                masks,
                mask.detach(),
                magnitude,
                momentum,
                rate,
                target * (1 + budget.tolerance / 4),
                budget.metric,
            )
            ever_dropped.update(dropped)
            mask = new.requires_grad_(True)
            masks.attach(lambda: mask)
            macs, params = masks.cost(new)
            updates.append(
                {
                    "step": state.step + 1,
                    "rate": rate,
                    "dropped": len(dropped),
                    "regrown": len(regrown),
                    "macs": macs,
                    "params": params,
                }
            )

        def metrics() -> dict[str, float]:
            return {"live_positions": float(mask.detach().sum()), "rewirings": float(len(updates))}

        def state() -> dict[str, Any]:
            return {
                "mask": mask.detach().clone(),
                "momentum": momentum.clone(),
                "ever_dropped": sorted(ever_dropped),
                "updates": list(updates),
            }

        def load_state(saved: dict[str, Any]) -> None:
            nonlocal mask, momentum
            mask = saved["mask"].clone().requires_grad_(True)
            momentum = saved["momentum"]
            ever_dropped.update(saved["ever_dropped"])
            updates[:] = saved["updates"]

        hooks = TrainHooks(after_step=after_step, metrics=metrics, state=state, load_state=load_state)
        with masks.attached(lambda: mask):
            epochs = self.train(model, job, hooks)
        final = mask.detach()
        revived = sorted(p for p in ever_dropped if final[p] > 0)
        info = {
            "updates": updates,
            "dropped_total": sum(u["dropped"] for u in updates),
            "regrown_total": sum(u["regrown"] for u in updates),
            "revived_positions": len(revived),
            "changed_from_start": int((final != start.mask).sum()),
        }
        history = self.remove(model, masks, final, job)
        return PruneOutcome(model, history, epochs, info)
