"""Driving family: rain, sun glare, low light, shadow and a dirty lens.

ImageNet-C has no tables for these; the severities below are this project's own, chosen so
severity 1 is a mild everyday condition and 5 a bad one, and so that every severity reuses
the same random geometry (drop positions, sun position, shadow edge, dirt layout) drawn
from the seed: a higher severity is the *same scene* under a stronger condition. Lengths
are fractions of the image side, so the look is the same from 28 px to 224 px.
"""

from __future__ import annotations

import math

import torch

from toolchain.robustness.corruptions import filters, ops
from toolchain.robustness.corruptions.base import Corruption, rand, randn, register, uniform


def _side(x: torch.Tensor) -> float:
    return math.sqrt(x.shape[-2] * x.shape[-1])


def _screen(x: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Screen blend: adds light without clipping highlights harshly (how glare/streaks compose)."""
    return 1 - (1 - x) * (1 - light.clamp(0, 1))


@register
class Rain(Corruption):
    """Rain: near-vertical bright streaks (drops motion-blurred along a shared slant), a dimmer
    and slightly hazier scene."""

    name, family = "rain", "driving"
    # Drops per pixel = DROPS / side, so the fraction of the image under streaks
    # (DROPS * LENGTH) is the same at every resolution.
    DROPS = (0.12, 0.18, 0.25, 0.33, 0.42)
    LENGTH = (0.10, 0.14, 0.18, 0.22, 0.26)  # streak length / side
    STREAK = (0.45, 0.5, 0.55, 0.6, 0.65)  # streak brightness
    DIM = (0.05, 0.1, 0.15, 0.2, 0.25)  # scene darkening
    HAZE = (0.0, 0.004, 0.008, 0.012, 0.016)  # blur sigma / side

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        i = severity - 1
        n, _, h, w = x.shape
        side = _side(x)
        # The same uniform field thresholded higher/lower: each severity's drops are a superset.
        drops = (rand((n, 1, h, w), generator, x) < self.DROPS[i] / side).float()
        drops = filters.gaussian_blur(drops, 0.003 * side)  # drops ~1 px wide at 32 px, ~2 px at 224
        drops = drops / drops.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        angle = uniform((n,), -100.0, -80.0, generator, x)
        length = max(2.0, self.LENGTH[i] * side)
        taps = 2 * math.ceil(length / 2) + 1
        # Huge sigma = flat weights: a streak of even brightness; rescale so one drop reaches 1.
        streaks = filters.motion_blur(drops, length / 2, 1e6, angle) * taps
        scene = filters.gaussian_blur(x, self.HAZE[i] * side) * (1 - self.DIM[i])
        return _screen(scene, self.STREAK[i] * streaks * ops.tint((0.9, 0.92, 1.0), x))


@register
class SunGlare(Corruption):
    """Low sun in view: a warm glow around a random point in the upper half, a ghost flare on
    the opposite side, and veiling glare that lifts the blacks everywhere."""

    name, family = "sun_glare", "driving"
    RADIUS = (0.15, 0.2, 0.25, 0.3, 0.35)  # glow std / side
    INTENSITY = (0.35, 0.5, 0.65, 0.8, 1.0)
    VEIL = (0.05, 0.1, 0.15, 0.22, 0.3)
    WARM = (1.0, 0.93, 0.75)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        i = severity - 1
        n, _, h, w = x.shape
        side = _side(x)
        cx = uniform((n,), 0.1, 0.9, generator, x) * w
        cy = uniform((n,), 0.05, 0.5, generator, x) * h
        glow = ops.soft_disc(h, w, cx, cy, torch.full((n,), self.RADIUS[i] * side, device=x.device), x)
        # Lens ghosts sit on the line from the sun through the image centre.
        gx, gy = w - cx, h - cy
        ghost = ops.soft_disc(h, w, gx, gy, torch.full((n,), 0.05 * side, device=x.device), x)
        light = self.INTENSITY[i] * (glow + 0.35 * ghost) * ops.tint(self.WARM, x)
        veiled = x * (1 - self.VEIL[i]) + self.VEIL[i] * ops.tint(self.WARM, x)
        return _screen(veiled, light)


@register
class LowLight(Corruption):
    """Dusk / night: darker exposure with a gamma, then sensor noise and 8-bit quantisation.

    The noise is the heteroscedastic Gaussian model of shot + read noise (variance
    ``x / photons + read^2``, as in Brooks et al., "Unprocessing Images for Learned Raw
    Denoising", CVPR 2019): the standard cheap stand-in for Poisson-Gaussian sensor noise.
    """

    name, family = "low_light", "driving"
    EXPOSURE = (0.65, 0.45, 0.3, 0.18, 0.1)
    GAMMA = (1.2, 1.35, 1.5, 1.7, 1.9)
    PHOTONS = (200, 120, 80, 50, 30)  # at full exposure; fewer photons = more shot noise
    READ_NOISE = (0.008, 0.012, 0.016, 0.022, 0.03)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        i = severity - 1
        dark = x.clamp(0, 1) ** self.GAMMA[i] * self.EXPOSURE[i]
        std = (dark / self.PHOTONS[i] + self.READ_NOISE[i] ** 2).sqrt()
        noisy = dark + std * randn(x.shape, generator, x)
        return torch.round(noisy.clamp(0, 1) * 255) / 255


@register
class Shadow(Corruption):
    """Cast shadows: a soft-edged half-plane (a building) and a band (a pole or tree trunk),
    darker and slightly bluish (lit by sky only) inside."""

    name, family = "shadow", "driving"
    DARKNESS = (0.25, 0.4, 0.5, 0.6, 0.7)  # fraction of light removed in the umbra
    SKY = (1.0, 0.96, 0.86)  # red loses most light in shade

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        side = _side(x)
        grid = ops.pixel_grid(n, h, w, x)  # (n, h, w, 2) x, y
        params = rand((n, 6), generator, x)

        def signed_distance(theta: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
            normal = torch.stack([torch.cos(theta), torch.sin(theta)], -1).view(n, 1, 1, 2)
            anchor = torch.stack([px, py], -1).view(n, 1, 1, 2)
            return ((grid - anchor) * normal).sum(-1)[:, None]

        two_pi = 2 * math.pi
        edge = signed_distance(
            two_pi * params[:, 0], (0.3 + 0.4 * params[:, 1]) * w, (0.3 + 0.4 * params[:, 2]) * h
        )
        half_plane = torch.sigmoid(edge / (0.03 * side))
        band_d = signed_distance(two_pi * params[:, 3], params[:, 4] * w, params[:, 5] * h)
        band = torch.sigmoid((0.08 * side - band_d.abs()) / (0.015 * side))
        mask = torch.maximum(half_plane, band)
        return x * (1 - self.DARKNESS[severity - 1] * mask * ops.tint(self.SKY, x))


@register
class DirtyLens(Corruption):
    """Dirt on the lens: out-of-focus brownish blotches that occlude and smear the scene, plus a
    light overall haze from scattered light."""

    name, family = "dirty_lens", "driving"
    THRESHOLD = (0.72, 0.64, 0.57, 0.5, 0.43)  # lower = more of the lens covered
    OPACITY = (0.45, 0.55, 0.65, 0.72, 0.8)
    HAZE = (0.02, 0.04, 0.06, 0.08, 0.1)
    DIRT = (0.42, 0.37, 0.3)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        i = severity - 1
        n, _, h, w = x.shape
        side = _side(x)
        field = ops.fractal_noise(n, (h, w), generator, x, base_cells=3, octaves=3)
        mask = ((field - self.THRESHOLD[i]) / 0.12).clamp(0, 1)
        mask = filters.gaussian_blur(mask, 0.02 * side) * self.OPACITY[i]  # dirt is out of focus
        smear = filters.gaussian_blur(x, 0.04 * side)
        dirt = 0.6 * ops.tint(self.DIRT, x) + 0.4 * smear
        hazy = x * (1 - self.HAZE[i]) + self.HAZE[i] * smear.mean(dim=(2, 3), keepdim=True)
        return hazy * (1 - mask) + dirt * mask
