"""Weather family: snow, frost, fog and brightness (ImageNet-C tables, procedural textures)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions import filters, ops
from toolchain.robustness.corruptions.base import (
    Corruption,
    pick,
    randn,
    register,
    spatial_scale,
    uniform,
)


@register
class Snow(Corruption):
    """Falling snow: thresholded, zoomed Gaussian flakes, motion-blurred downwards, over a
    whitened scene (ImageNet-C recipe; the flake layer and its 180-degree copy are both added).
    """

    name, family = "snow", "weather"
    # (loc, scale, zoom, threshold, blur radius, blur sigma, scene blend)
    SMALL = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )
    LARGE = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        loc, scale, zoom, thresh, radius, sigma, blend = pick(x, severity, self.SMALL, self.LARGE)
        n, _, h, w = x.shape
        s = spatial_scale(x)
        # A centre crop zoomed by `zoom` == a smaller noise field upsampled to full size.
        small = (math.ceil(h / zoom), math.ceil(w / zoom))
        flakes = loc + scale * randn((n, 1, *small), generator, x)
        flakes = F.interpolate(flakes, size=(h, w), mode="bilinear", align_corners=False)
        flakes = torch.where(flakes < thresh, torch.zeros_like(flakes), flakes).clamp_(0, 1)
        angle = uniform((n,), -135.0, -45.0, generator, x)
        flakes = filters.motion_blur(flakes, radius * s, sigma * s, angle)
        # Whitened scene, blend * x + (1 - blend) * max(x, 1.5 grey + 0.5), plus both flake
        # layers, in place on one full-size buffer.
        out = torch.maximum(x, ops.luminance(x).mul_(1.5).add_(0.5))
        out.mul_(1 - blend).add_(x, alpha=blend)
        return out.add_(flakes.add_(flakes.flip(-1, -2)))


def frost_texture(
    n: int, size: tuple[int, int], generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Procedural ice ``(n, 1, H, W)`` in [0, 1]: a cloudy haze plus ridged-noise crystal veins.

    Stands in for ImageNet-C's six frost photographs: ``1 - |2 r - 1|`` of fractal noise ``r`` peaks
    along thin curved lines, which read as crystal edges; two scales give fine and coarse veins.
    """
    haze = ops.fractal_noise(n, size, generator, like, base_cells=2, octaves=4)
    ridges = ops.fractal_noise(n, size, generator, like, base_cells=4, octaves=3, persistence=0.6, channels=2)
    fine, coarse = ridges[:, :1], ridges[:, 1:]
    # Powers as repeated squaring: ``**`` with a float exponent costs a transcendental per pixel.
    fine2 = (1 - (2 * fine - 1).abs()).square_()
    coarse2 = (1 - (2 * coarse - 1).abs()).square_()
    veins = fine2.square_().square_().add_(coarse2 * coarse2.square(), alpha=0.7)  # r^8 + 0.7 r^6
    return (0.25 + 0.45 * haze * haze.sqrt() + 0.6 * veins).clamp_(0, 1)


@register
class Frost(Corruption):
    """Frost on the lens or windscreen: ``a * x + b * ice`` with a procedural bluish ice texture.

    On a one-channel batch the ice is its luminance (no tint).
    """

    name, family = "frost", "weather"
    SMALL = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (scene, frost) weights
    LARGE = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))
    ICE = (0.80, 0.90, 1.0)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        a, b = pick(x, severity, self.SMALL, self.LARGE)
        texture = frost_texture(x.shape[0], (x.shape[-2], x.shape[-1]), generator, x)
        return torch.mul(x, a).addcmul_(texture, ops.tint(self.ICE, x), value=b)  # a x + b ice


@register
class Fog(Corruption):
    """Fog: a diamond-square plasma cloud added, then the image renormalised by its peak."""

    name, family = "fog", "weather"
    chunk_bytes = 1 << 23  # the plasma's many small per-level steps favour bigger chunks
    SMALL = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # (strength, wibble decay)
    LARGE = ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        strength, decay = pick(x, severity, self.SMALL, self.LARGE)
        n, _, h, w = x.shape
        cloud = ops.plasma_fractal(n, ops.next_pow2(max(h, w)), decay, generator, x)[:, None, :h, :w]
        peak = x.flatten(1).amax(dim=1).view(n, 1, 1, 1)
        return torch.add(x, cloud, alpha=strength).mul_(peak / (peak + strength))


@register
class Brightness(Corruption):
    """Brighter exposure: HSV value ``V + c`` with hue and saturation kept.

    With H and S fixed every channel scales with V, so this is ``x * V'/V`` (black goes grey),
    no HSV round trip needed; works for any channel count (grey: ``x + c``).
    """

    name, family = "brightness", "weather"
    SMALL = (0.05, 0.1, 0.15, 0.2, 0.3)
    LARGE = (0.1, 0.2, 0.3, 0.4, 0.5)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        c = pick(x, severity, self.SMALL, self.LARGE)
        v = x.amax(dim=1, keepdim=True)
        v_new = (v + c).clamp_(max=1.0)
        black = v <= 1e-6  # hue undefined: black becomes grey V' (all channels equal)
        ratio = torch.where(black, torch.zeros_like(v), v_new / v.clamp_min(1e-6))
        # One full-size pass: x * ratio, plus V' where the pixel was black (x is 0 there).
        return torch.addcmul(v_new * black, x, ratio)
