"""Per-batch training losses: clean cross-entropy, PGD-AT (Madry et al.) and TRADES (Zhang et al.)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.recipe import AttackConfig, TrainConfig
from toolchain.robustness.attacks.pgd import pgd_attack


@contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """Craft perturbations with frozen BN statistics, then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pgd_examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, generator: torch.Generator
) -> torch.Tensor:
    """PGD examples for training, crafted in eval mode so adversarial batches never pollute BN stats."""
    with _in_eval_mode(model):
        return pgd_attack(
            model,
            x,
            y,
            eps=attack.eps,
            step_size=attack.step_size,
            steps=attack.steps,
            norm=attack.norm,
            random_start=attack.random_start,
            generator=generator,
        )


def trades_examples(
    model: nn.Module, x: torch.Tensor, attack: AttackConfig, generator: torch.Generator
) -> torch.Tensor:
    """TRADES inner maximisation: x' maximises KL(f(x) || f(x')) from x + 0.001·N(0, 1)."""
    with _in_eval_mode(model), torch.enable_grad():
        requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            p_clean = F.softmax(model(x), dim=1).detach()
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_adv = (x + 0.001 * noise).clamp(0, 1).detach()
            for _ in range(attack.steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
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


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    adversarial: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss for one batch and the logits the accuracy is read from.

    Args:
        adversarial: False during clean warm-up epochs, whatever ``cfg.loss`` says.

    Returns:
        ``(loss, logits)``; logits are on the adversarial inputs for PGD-AT, clean otherwise.
    """
    if not adversarial or cfg.loss == "clean" or cfg.attack.eps <= 0:
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    if cfg.loss == "pgd":
        x_adv = pgd_examples(model, x, y, cfg.attack, generator)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits
    x_adv = trades_examples(model, x, cfg.attack, generator)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + cfg.trades_beta * robust, logits
