"""Per-batch training losses, one registered function each: clean, PGD-AT (Madry et al.), TRADES
(Zhang et al.), hybrid, mixed noise, and distillation from the dense model (ARD, RSLAD)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from exporters.outputs import map_outputs, take
from toolchain.errors import UserError
from toolchain.recipe import AttackConfig, TrainConfig
from toolchain.registry import Registry
from toolchain.robustness.attacks.base import eval_mode
from toolchain.robustness.attacks.pgd import pgd_examples
from toolchain.tasks import task_of
from toolchain.training.distill import DISTILL_LOSSES, Teacher, soft_divergence
from toolchain.training.mixed import MixedNoise, random_corruptions


def trades_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRADES inner maximisation: x' maximises KL(f(x) || f(x')) from x + 0.001·N(0, 1).

    The KL is the model's task's :meth:`~toolchain.tasks.Task.divergence` (summed): per image
    for classification, over the labelled pixels (``y``) for segmentation. ``reference``
    replaces the model's own clean output f(x) as the distribution to move away from (RSLAD
    passes the teacher's).
    """
    task = task_of(model)
    with eval_mode(model), torch.enable_grad():
        requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            clean = map_outputs(torch.Tensor.detach, model(x) if reference is None else reference)
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


@dataclass
class Batch:
    """One batch as a registered loss sees it.

    Attributes:
        owner: the :class:`BatchLoss` calling (its config, perturbation, teacher, mixed noise).
        net: the module the main forward pass goes through (a DDP wrapper, or ``raw``).
        raw: the model itself: attacks and second forward passes go through it.
        x, y: the clean batch; generator: the CPU generator of random starts and draws.
    """

    owner: BatchLoss
    net: nn.Module
    raw: nn.Module
    x: torch.Tensor
    y: Any
    generator: torch.Generator

    @property
    def cfg(self) -> TrainConfig:
        return self.owner.cfg

    def ce(self, out: Any) -> torch.Tensor:
        """The task's loss against the hard labels (per pixel for segmentation)."""
        return task_of(self.raw).loss(out, self.y)

    def adversarial(self) -> torch.Tensor:
        """The recipe's PGD examples, or the method's own perturbation, crafted in eval mode."""
        if self.owner.perturb is None:
            return pgd_examples(self.raw, self.x, self.y, self.cfg.attack, self.generator)
        with eval_mode(self.raw):
            return self.owner.perturb(self.raw, self.x, self.y).detach()

    def teacher(self) -> Teacher:
        assert self.owner.teacher is not None  # BatchLoss refuses distillation without one
        return self.owner.teacher


#: ``batch -> (loss, logits)``; the logits are those the epoch's accuracy is read from.
LossFunction = Callable[[Batch], tuple[torch.Tensor, Any]]

#: The values of ``TrainConfig.loss``.
LOSSES: Registry[LossFunction] = Registry("training loss")


@LOSSES.register("clean")
def clean_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """CE(f(x), y)."""
    logits = b.net(b.x)
    return b.ce(logits), logits


@LOSSES.register("pgd")
def pgd_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """Madry PGD-AT: CE(f(x_adv), y)."""
    logits = b.net(b.adversarial())
    return b.ce(logits), logits


@LOSSES.register("hybrid")
def hybrid_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """(1 - w) * CE(f(x), y) + w * CE(f(x_adv), y), one forward pass over both halves (the loss of
    DNR and BAP; ``w = adv_weight``)."""
    x_adv = b.adversarial()
    both = b.net(torch.cat([b.x, x_adv]))
    n = len(b.x)
    clean, adv = take(both, 0, n), take(both, n, 2 * n)
    w = b.cfg.adv_weight
    return (1 - w) * b.ce(clean) + w * b.ce(adv), clean


@LOSSES.register("mixed")
def mixed_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """CE on a mixed-noise batch (:mod:`toolchain.training.mixed`)."""
    assert b.owner.mixed is not None
    logits = b.net(b.owner.mixed.compose(b.raw, b.x, b.y, b.generator).x)
    return b.ce(logits), logits


@LOSSES.register("trades")
def trades_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """CE(f(x), y) + beta * KL(f(x) || f(x')) (Zhang et al. 2019)."""
    x_adv = trades_examples(b.raw, b.x, b.y, b.cfg.attack, b.generator)
    logits = b.net(b.x)
    robust = task_of(b.raw).divergence(b.raw(x_adv), logits, b.y)
    return b.ce(logits) + b.cfg.trades_beta * robust, logits


@LOSSES.register("ard")
def ard_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """ARD: w * T^2 * KL(t(x)/T || s(x_adv)/T) + (1 - w) * CE(s(x), y), x_adv from the recipe's
    attack on the student (:mod:`toolchain.training.distill`)."""
    d = b.cfg.distill
    soft = b.teacher()(b.x)
    x_adv = b.adversarial()
    both = b.net(torch.cat([b.x, x_adv]))
    n = len(b.x)
    clean, adv = take(both, 0, n), take(both, n, 2 * n)
    loss = d.adv_weight * soft_divergence(adv, soft, b.y, b.raw, d.temperature)
    loss = loss + (1 - d.adv_weight) * b.ce(clean)
    return loss + corruption_term(b), adv


@LOSSES.register("rslad")
def rslad_loss(b: Batch) -> tuple[torch.Tensor, Any]:
    """RSLAD: the teacher's soft labels t(x) in the attack and in both terms:
    w * T^2 * KL(t(x)/T || s(x_adv)/T) + (1 - w) * T^2 * KL(t(x)/T || s(x)/T)."""
    d = b.cfg.distill
    soft = b.teacher()(b.x)
    x_adv = trades_examples(b.raw, b.x, b.y, b.cfg.attack, b.generator, reference=soft)
    both = b.net(torch.cat([b.x, x_adv]))
    n = len(b.x)
    clean, adv = take(both, 0, n), take(both, n, 2 * n)
    loss = d.adv_weight * soft_divergence(adv, soft, b.y, b.raw, d.temperature)
    loss = loss + (1 - d.adv_weight) * soft_divergence(clean, soft, b.y, b.raw, d.temperature)
    return loss + corruption_term(b), adv


def corruption_term(b: Batch) -> torch.Tensor | float:
    """c * T^2 * KL(t(x_c)/T || s(x_c)/T) on a randomly corrupted copy of the batch (0 if c = 0)."""
    d = b.cfg.distill
    if d.corruption_weight == 0:
        return 0.0
    x_c = random_corruptions(b.x, d.corruptions, d.severities, b.generator)
    student = b.raw(x_c)  # a second forward pass: through the module, as TRADES' (see BatchLoss)
    return d.corruption_weight * soft_divergence(student, b.teacher()(x_c), b.y, b.raw, d.temperature)


class BatchLoss:
    """The training loss of one batch, the function :data:`LOSSES` registers as
    ``TrainConfig.loss``.

    CE and KL are the model's task's (:func:`toolchain.tasks.task_of`): per pixel, over the
    labelled pixels, for segmentation models. Adversarial inputs are crafted in eval mode;
    ``perturb`` replaces the recipe's PGD for ``pgd``, ``hybrid`` and ``ard``. The object keeps
    state across batches (the mixed-noise generator).

    Args:
        cfg: the training section.
        perturb: a method's perturbation replacing the recipe's attack.
        teacher: the dense model, for ``ard`` and ``rslad`` (a frozen copy is kept on ``device``).

    Raises:
        UserError: ``ard``/``rslad`` without a teacher (the dense model's own training).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        perturb: Perturbation | None = None,
        teacher: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.perturb = perturb
        self.loss = LOSSES.get(cfg.loss)
        self.mixed = MixedNoise(cfg.mixed, cfg.attack) if cfg.loss == "mixed" else None
        self.teacher: Teacher | None = None
        if cfg.loss in DISTILL_LOSSES:
            if teacher is None:
                raise UserError(
                    f"loss {cfg.loss!r} distils from the dense model, which this training has not got: "
                    "use it in finetune or a pruning method's train section, not for the dense model"
                )
            self.teacher = Teacher(teacher, device)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the mixed-noise generator and its optimiser, if any."""
        return self.mixed.state_dict() if self.mixed is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixed is not None and state:
            self.mixed.load_state_dict(state)

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
        """``(loss, logits)``; logits (a tensor, or a detector's tuple of heads) are those
        accuracy is read from (the adversarial ones for PGD-AT, mixed and distillation batches,
        the clean ones otherwise).

        Args:
            model: the model the loss's main forward pass goes through.
            adversarial: False during clean warm-up epochs, whatever ``cfg.loss`` says.
            craft: the same model unwrapped, when ``model`` is a DistributedDataParallel wrapper:
                attacks and second forward passes go through it, since the wrapper expects
                exactly one forward pass per backward (gradients through either are the same
                parameters' and are synchronised alike).
        """
        batch = Batch(self, model, craft if craft is not None else model, x, y, generator)
        no_attack = self.cfg.attack.eps <= 0 and self.perturb is None
        if not adversarial or (no_attack and self.cfg.loss not in DISTILL_LOSSES):
            return clean_loss(batch)
        return self.loss(batch)
