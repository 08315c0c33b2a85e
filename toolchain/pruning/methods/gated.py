"""``gated``: channel gates trained on mixed-noise batches, robust channels kept.

Luo et al., "Robust Network Pruning with ..." (IEEE TCSVT 2023). Only the abstract is available:
mixed noise samples (several adversarial attacks plus a learned adversarial perturbation
generator) imitate real-world perturbations; a plug-in feature scoring module and a
contribution-difference loss score how robust intermediate features are; a gating mechanism
keeps robust channels during training; compression is layer-wise or block-wise. Everything
below is our design from that description:

* one gate ``g = sigmoid(a)`` per channel of each torch-pruning dependency group, multiplying
  the channel at every layer that consumes it (a soft mask), trained jointly with the weights;
* batches come from the mixed-noise loss (``train.loss: mixed``: clean, FGSM, PGD, corruptions
  from our suite and a learned perturbation generator, see :mod:`toolchain.training.mixed`);
* feature score: on a sub-batch and its perturbed copy (half FGSM, half a random corruption),
  each channel's contribution is its gated activation ``g * a`` where it is consumed; the
  contribution difference ``d = mean|a - a'| / (mean|a| + mean|a'|)`` (same images, clean vs
  perturbed) is in [0, 1]; its running mean gives each channel a stability ``1 - d``;
* contribution-difference loss ``mean(g * d)`` (weight ``contribution_weight``) pushes gates of
  unstable channels down and makes the features themselves steadier; an L1 pull ``l1 * sum(g)``
  closes gates nothing defends;
* at the end the channels with the highest ``g * stability`` are kept under the budget:
  ``allocation: layer`` (every group loses the same fraction), ``block`` (groups of one block
  compete) or ``global``; the kept gates are folded into the consuming weights, so the pruned
  model computes what the gated one did with the removed gates at zero.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from toolchain.pruning.masks import ChannelMasks
from toolchain.pruning.methods.base import METHODS, PruneJob, PruneOutcome
from toolchain.pruning.methods.masked import MaskedMethod
from toolchain.recipe_prune import PGD3, Allocation, TrainingSection
from toolchain.recipe_train import Number, TrainConfig
from toolchain.robustness.attacks.base import eval_mode
from toolchain.robustness.attacks.pgd import pgd_examples, single_step
from toolchain.robustness.corruptions import corrupt
from toolchain.training import Step, TrainHooks

PAIR_BATCH = 16  # images per step on which clean and perturbed contributions are compared
STABILITY_DECAY = 0.95


def contribution_difference(
    masks: ChannelMasks, clean: list[tuple[Tensor, Tensor]], perturbed: list[tuple[Tensor, Tensor]]
) -> Tensor:
    """Per position, ``mean |a - a'| / (mean |a| + mean |a'|)`` in [0, 1], where ``a`` and
    ``a'`` are the channel's gated activations on the same images, clean and perturbed, where
    it is consumed; a channel that answers the perturbation rather than the image scores high.
    """
    change, size = [], []
    for (where, a), (_, b) in zip(clean, perturbed):
        dims = [d for d in range(a.dim()) if d != (1 if a.dim() > 2 else a.dim() - 1)]
        change.append((where, (a - b).abs().mean(dims)))
        size.append((where, a.abs().mean(dims) + b.abs().mean(dims)))
    return masks.per_position(change) / masks.per_position(size).clamp_min(1e-8)


class GatedConfig(TrainingSection):
    """Gated mixed-noise pruning (our design from Luo et al. 2023's abstract).

    Per-channel gates ``sigmoid(a)`` train with the weights on ``train`` (``loss: mixed``
    normally), pulled down by ``l1`` and by the contribution-difference loss (weight
    ``contribution_weight``), which penalises gates on channels whose contribution changes
    most between clean and perturbed inputs. At the end the top channels by gate times
    feature stability are kept under the budget (``allocation``) and the rest removed.
    """

    train: TrainConfig = TrainConfig(epochs=5, lr=0.01, loss="mixed", attack=PGD3)
    gate_lr: Number = Field(0.02, gt=0, description="Adam learning rate of the gate logits")
    gate_init: float = Field(3.0, description="initial gate logit (sigmoid(3) = 0.95)")
    l1: Number = Field(5e-4, ge=0, description="weight of the L1 pull on the gates (per channel)")
    contribution_weight: Number = Field(1.0, ge=0, description="weight of the contribution-difference loss")
    allocation: Allocation = Field("layer", description="layer-wise, block-wise or global competition")
    block_depth: int = Field(3, ge=1, description="'block': groups whose root names share this many parts")


@METHODS.register("gated")
class Gated(MaskedMethod):
    """Gates on mixed-noise batches with a contribution-difference loss; top gates kept."""

    name = "gated"
    settings = GatedConfig
    description = "gates trained on mixed-noise batches; channels whose features stay steady kept"

    def run(self, model: nn.Module, job: PruneJob) -> PruneOutcome:
        own: GatedConfig = self.own
        masks = self.masks(model, job)
        logits = nn.Parameter(torch.full((masks.total,), float(own.gate_init)))
        stability = torch.ones(masks.total)
        rng = torch.Generator().manual_seed(job.seed + 17)
        names, severities = own.train.mixed.corruptions, own.train.mixed.severities
        attack = own.train.attack

        def gates() -> Tensor:
            return torch.sigmoid(logits)

        def gate_optimizer() -> torch.optim.Optimizer:
            # Adam: gate logits must travel several units whatever the scale of their gradient.
            return torch.optim.Adam([logits], lr=own.gate_lr)

        def perturbed(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            half = len(x) // 2
            out = x.clone()
            out[:half] = pgd_examples(m, x[:half], y[:half], single_step(attack, random_start=True), rng)
            if len(x) > half:
                name = (
                    names[int(torch.randint(len(names), (1,), generator=rng))] if names else "gaussian_noise"
                )
                severity = severities[int(torch.randint(len(severities), (1,), generator=rng))]
                out[half:] = corrupt(
                    name, x[half:], severity, seed=int(torch.randint(2**31 - 1, (1,), generator=rng))
                )
            return out

        def extra_loss(state: Step) -> Tensor:
            nonlocal stability
            x, y = state.x[:PAIR_BATCH], state.y[:PAIR_BATCH]
            x_pert = perturbed(state.model, x, y)
            # Eval mode: batch statistics would normalise away the very shift being measured.
            with eval_mode(state.model):
                with masks.capture() as clean:
                    state.model(x)
                with masks.capture() as pert:
                    state.model(x_pert)
            d = contribution_difference(masks, clean, pert)
            stability = STABILITY_DECAY * stability + (1 - STABILITY_DECAY) * (1 - d.detach())
            g = gates()
            return own.contribution_weight * (g * d).mean() + own.l1 * g.sum()

        def metrics() -> dict[str, float]:
            g = gates().detach()
            return {"gate_mean": float(g.mean()), "gates_below_half": float((g < 0.5).sum())}

        def state() -> dict[str, Any]:
            return {"logits": logits.detach().clone(), "stability": stability.clone(), "rng": rng.get_state()}

        def load_state(saved: dict[str, Any]) -> None:
            nonlocal stability
            logits.data.copy_(saved["logits"])
            stability = saved["stability"]
            rng.set_state(saved["rng"])

        hooks = TrainHooks(
            side_optimizer=gate_optimizer,
            extra_loss=extra_loss,
            metrics=metrics,
            state=state,
            load_state=load_state,
        )
        with masks.attached(gates):
            epochs = self.train(model, job, hooks)
        g = gates().detach()
        score = g * stability
        chosen = self.allocate(masks, score, job, own.allocation)
        masks.fold(g * chosen.mask)
        info: dict[str, Any] = {
            "gates": {group.root: round(float(values.mean()), 4) for group, values in masks.per_group(g)},
            "stability": {group.root: round(float(v.mean()), 4) for group, v in masks.per_group(stability)},
            "gate_mean": float(g.mean()),
            "kept_gate_mean": float(g[chosen.mask > 0].mean()),
            "removed_gate_mean": float(g[chosen.mask == 0].mean()) if (chosen.mask == 0).any() else None,
            "stability_mean": float(stability.mean()),
        }
        history = self.remove(model, masks, chosen.mask, job)
        return PruneOutcome(model, history, epochs, info)
