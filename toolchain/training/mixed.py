"""Mixed-noise batches: clean, FGSM, PGD, corrupted and generator-perturbed samples in one batch.

Our reading of Luo et al. (TCSVT 2023, abstract only): robustness to the perturbations a
deployed model meets comes from training on a mixture of them, including perturbations from
a small generator network trained adversarially (it maximises the classifier's loss under an
L-inf bound). The proportions, corruption names and severities are settings
(:class:`~toolchain.recipe_train.MixedNoiseConfig`); which image gets which kind is drawn
from the training generator, so a seeded run is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from toolchain.recipe_train import AttackConfig, MixedNoiseConfig
from toolchain.robustness.attacks.pgd import pgd_examples, single_step
from toolchain.robustness.corruptions import corrupt
from toolchain.tasks import take_labels, task_of

KINDS = ("clean", "fgsm", "pgd", "corruption", "generator")


class PerturbationGenerator(nn.Module):
    """A small fully convolutional network mapping an image to a bounded perturbation.

    ``delta = eps * tanh(net(x))``: any output is inside the L-inf ball, so no projection is
    needed, and the last layer starts at zero so training starts from the clean image.
    """

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, eps: float) -> Tensor:
        return (x + eps * torch.tanh(self.net(x))).clamp(0, 1)


@dataclass
class MixedBatch:
    """A composed batch: ``x`` with one kind per image (indices into :data:`KINDS`)."""

    x: Tensor
    kinds: Tensor


def split_counts(batch: int, cfg: MixedNoiseConfig) -> dict[str, int]:
    """How many images of a batch get each kind: largest remainders, so they sum to ``batch``."""
    shares = {kind: getattr(cfg, kind) * batch for kind in KINDS}
    counts = {kind: int(share) for kind, share in shares.items()}
    left = batch - sum(counts.values())
    for kind in sorted(KINDS, key=lambda k: (-(shares[k] - counts[k]), KINDS.index(k)))[:left]:
        counts[kind] += 1
    return counts


class MixedNoise:
    """Composes mixed-noise batches and trains the perturbation generator as it goes.

    Args:
        cfg: proportions, corruptions, generator settings.
        attack: the L-inf budget and PGD settings for ``fgsm``, ``pgd`` and ``generator``.
    """

    def __init__(self, cfg: MixedNoiseConfig, attack: AttackConfig) -> None:
        self.cfg = cfg
        self.attack = attack
        self.generator: PerturbationGenerator | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _ensure_generator(self, x: Tensor) -> PerturbationGenerator:
        if self.generator is None:
            self.generator = PerturbationGenerator(x.shape[1], self.cfg.generator_width).to(x.device)
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.generator_lr)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        if self.generator is None or self.optimizer is None:
            return {}
        first = self.generator.net[0]
        assert isinstance(first, nn.Conv2d)
        return {
            "channels": first.in_channels,
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = next(iter(state["generator"].values())).device
        self._ensure_generator(torch.empty(1, int(state["channels"]), 1, 1, device=device))
        assert self.generator is not None and self.optimizer is not None
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def compose(self, model: nn.Module, x: Tensor, y: Tensor, rng: torch.Generator) -> MixedBatch:
        """Perturb parts of ``(x, y)`` in place of the clean images; the model is used in eval mode.

        Args:
            model: the classifier being trained (its parameter gradients are left untouched).
            x, y: a clean batch.
            rng: CPU generator deciding which image gets which kind, corruption and severity.
        """
        counts = split_counts(len(x), self.cfg)
        order = torch.randperm(len(x), generator=rng)
        kinds = torch.empty(len(x), dtype=torch.long)
        out = x.detach().clone()
        start = 0
        was_training = model.training
        model.eval()
        try:
            for k, kind in enumerate(KINDS):
                idx = order[start : start + counts[kind]]
                start += counts[kind]
                kinds[idx] = k
                if len(idx) and kind != "clean":
                    out[idx] = self._perturb(kind, model, x[idx], take_labels(y, idx), rng)
        finally:
            model.train(was_training)
        return MixedBatch(out, kinds)

    def _perturb(self, kind: str, model: nn.Module, x: Tensor, y: Tensor, rng: torch.Generator) -> Tensor:
        a = self.attack
        if kind == "fgsm":
            return pgd_examples(model, x, y, single_step(a))
        if kind == "pgd":
            return pgd_examples(model, x, y, a, rng)
        if kind == "corruption":
            return self._corrupt(x, rng)
        return self._generate(model, x, y)

    def _corrupt(self, x: Tensor, rng: torch.Generator) -> Tensor:
        return random_corruptions(x, self.cfg.corruptions, self.cfg.severities, rng)

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One generator step up the model's task loss, then its perturbation of ``x``."""
        generator = self._ensure_generator(x)
        assert self.optimizer is not None
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                # The task's loss: per pixel (over labelled pixels) for segmentation models.
                loss = -task_of(model).loss(model(generator(x, self.attack.eps)), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        finally:
            for p, flag in zip(model.parameters(), requires):
                p.requires_grad_(flag)
        with torch.no_grad():
            return generator(x, self.attack.eps)


def random_corruptions(
    x: Tensor, names: Sequence[str], severities: Sequence[int], rng: torch.Generator
) -> Tensor:
    """``x`` with one corruption of ``names`` at one of ``severities`` per image, drawn from ``rng``."""
    which = torch.randint(len(names), (len(x),), generator=rng)
    level = torch.randint(len(severities), (len(x),), generator=rng)
    seed = int(torch.randint(2**31 - 1, (1,), generator=rng))
    out = x.clone()
    # One call per (corruption, severity) drawn, so each call is still batched.
    for pair in torch.unique(which * len(severities) + level).tolist():
        n, s = divmod(pair, len(severities))
        idx = torch.nonzero((which == n) & (level == s)).flatten()
        out[idx] = corrupt(names[n], x[idx], severities[s], seed=seed + pair)
    return out
