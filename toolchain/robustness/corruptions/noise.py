"""Noise family: gaussian, shot, impulse and speckle noise (ImageNet-C tables)."""

from __future__ import annotations

import torch

from toolchain.robustness.corruptions import ops
from toolchain.robustness.corruptions.base import (
    Corruption,
    int16_threshold,
    pick,
    rand_int16,
    randn,
    register,
)


@register
class GaussianNoise(Corruption):
    """Additive N(0, sigma^2) noise per pixel and channel."""

    name, family = "gaussian_noise", "noise"
    SMALL = (0.04, 0.06, 0.08, 0.09, 0.10)  # CIFAR-10-C sigma
    LARGE = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C sigma

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        sigma = pick(x, severity, self.SMALL, self.LARGE)
        return torch.add(x, randn(x.shape, generator, x), alpha=sigma)


@register
class ShotNoise(Corruption):
    """Poisson photon noise: ``Poisson(x * photons) / photons`` (fewer photons = worse)."""

    name, family = "shot_noise", "noise"
    SMALL = (500, 250, 100, 75, 50)
    LARGE = (60, 25, 12, 5, 3)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        photons = float(pick(x, severity, self.SMALL, self.LARGE))
        return ops.poisson_levels(x, photons, generator).div_(photons)


@register
class ImpulseNoise(Corruption):
    """Salt-and-pepper: a fraction ``amount`` of values set to 0 or 1 (half each, like skimage s&p)."""

    name, family = "impulse_noise", "noise"
    SMALL = (0.01, 0.02, 0.03, 0.05, 0.07)
    LARGE = (0.03, 0.06, 0.09, 0.17, 0.27)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        amount = pick(x, severity, self.SMALL, self.LARGE)
        # One draw decides both "hit" and "salt or pepper", so severities share hit order; 16-bit
        # draws resolve the amount to 1/65536, finer than any table entry needs.
        u = rand_int16(x.shape, generator, x)
        hit = u < int16_threshold(amount)
        salt = u < int16_threshold(amount / 2)
        return torch.where(hit, salt.to(x.dtype), x)


@register
class SpeckleNoise(Corruption):
    """Multiplicative noise ``x + x * N(0, sigma^2)`` (brighter pixels get noisier)."""

    name, family = "speckle_noise", "noise"
    SMALL = (0.06, 0.10, 0.12, 0.16, 0.20)
    LARGE = (0.15, 0.20, 0.35, 0.45, 0.60)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        sigma = pick(x, severity, self.SMALL, self.LARGE)
        return torch.addcmul(x, x, randn(x.shape, generator, x).mul_(sigma))
