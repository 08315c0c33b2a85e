"""Per-batch training losses: clean, PGD-AT (Madry et al.), TRADES (Zhang et al.), hybrid, mixed noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from exporters.outputs import map_outputs, take
from toolchain.recipe import AttackConfig, TrainConfig
from toolchain.robustness.attacks.base import eval_mode
from toolchain.robustness.attacks.pgd import pgd_examples
from toolchain.tasks import task_of
from toolchain.training.mixed import MixedNoise


def trades_examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, generator: torch.Generator
) -> torch.Tensor:
    """TRADES inner maximisation: x' maximises KL(f(x) || f(x')) from x + 0.001·N(0, 1).

    The KL is the model's task's :meth:`~toolchain.tasks.Task.divergence` (summed): per image
    for classification, over the labelled pixels (``y``) for segmentation.
    """
    task = task_of(model)
    with eval_mode(model), torch.enable_grad():
        requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            clean = map_outputs(torch.Tensor.detach, model(x))
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_adv = (x + 0.001 * noise).clamp(0, 1).detach()
            for _ in range(attack.steps):
                x_adv.requires_grad_(True)
                kl = task.divergence(model(x_adv), clean, y, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                if attack.norm == "linf":
                    x_adv = x_adv.detach() + attack.step_size * grad.sign()
                    x_adv = torch.min(torch.max(x_adv, x - attack.eps), x + attack.eps)
                else:
                    g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = x_adv.detach() + attack.step_size * g - x
                    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
                    delta = delta * (attack.eps / norms).clamp(max=1.0).view(-1, 1, 1, 1)
                    x_adv = x + delta
                x_adv = x_adv.clamp(0, 1).detach()
        finally:
            for p, flag in zip(model.parameters(), requires_grad):
                p.requires_grad_(flag)
    return x_adv


#: A per-batch perturbation a method supplies instead of the recipe's attack (BAP's
#: cutoff-scaled DeepFool): ``perturb(model, x, y) -> x_adv``, called with the model in eval mode.
Perturbation = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class BatchLoss:
    """The training loss of one batch, as ``TrainConfig.loss`` names it.

    CE and KL are the model's task's (:func:`toolchain.tasks.task_of`): per pixel, over the
    labelled pixels, for segmentation models.

    * ``clean``: CE(f(x), y).
    * ``pgd``: Madry PGD-AT, CE(f(x_adv), y).
    * ``trades``: CE(f(x), y) + beta * KL(f(x) || f(x')) (Zhang et al. 2019).
    * ``hybrid``: (1 - w) * CE(f(x), y) + w * CE(f(x_adv), y), one forward pass over both halves
      (the loss of DNR and BAP; ``w = adv_weight``).
    * ``mixed``: CE on a mixed-noise batch (:mod:`toolchain.training.mixed`).

    Adversarial inputs are crafted in eval mode; ``perturb`` replaces the recipe's PGD for
    ``pgd`` and ``hybrid``. The object keeps state across batches (the mixed-noise generator).
    """

    def __init__(self, cfg: TrainConfig, perturb: Perturbation | None = None) -> None:
        self.cfg = cfg
        self.perturb = perturb
        self.mixed = MixedNoise(cfg.mixed, cfg.attack) if cfg.loss == "mixed" else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the mixed-noise generator and its optimiser, if any."""
        return self.mixed.state_dict() if self.mixed is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixed is not None and state:
            self.mixed.load_state_dict(state)

    def _adversarial(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        if self.perturb is None:
            return pgd_examples(model, x, y, self.cfg.attack, rng)
        with eval_mode(model):
            return self.perturb(model, x, y).detach()

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        adversarial: bool,
        generator: torch.Generator,
        craft: nn.Module | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """``(loss, logits)``; logits (a tensor, or a detector's tuple of heads) are those accuracy
        is read from (the adversarial ones for PGD-AT and mixed batches, the clean ones otherwise).

        Args:
            model: the model the loss's main forward pass goes through.
            adversarial: False during clean warm-up epochs, whatever ``cfg.loss`` says.
            craft: the same model unwrapped, when ``model`` is a DistributedDataParallel wrapper:
                attacks and TRADES' second forward go through it, since the wrapper expects
                exactly one forward pass per backward (gradients through either are the same
                parameters' and are synchronised alike).
        """
        cfg = self.cfg
        raw = craft if craft is not None else model
        ce = task_of(raw).loss  # per pixel for segmentation models
        if not adversarial or cfg.loss == "clean" or (cfg.attack.eps <= 0 and self.perturb is None):
            logits = model(x)
            return ce(logits, y), logits
        if cfg.loss == "pgd":
            logits = model(self._adversarial(raw, x, y, generator))
            return ce(logits, y), logits
        if cfg.loss == "hybrid":
            x_adv = self._adversarial(raw, x, y, generator)
            both = model(torch.cat([x, x_adv]))
            clean, adv = take(both, 0, len(x)), take(both, len(x), 2 * len(x))
            w = cfg.adv_weight
            return (1 - w) * ce(clean, y) + w * ce(adv, y), clean
        if cfg.loss == "mixed":
            assert self.mixed is not None
            logits = model(self.mixed.compose(raw, x, y, generator).x)
            return ce(logits, y), logits
        task = task_of(raw)
        x_adv = trades_examples(raw, x, y, cfg.attack, generator)
        logits = model(x)
        robust = task.divergence(raw(x_adv), logits, y)
        return task.loss(logits, y) + cfg.trades_beta * robust, logits
