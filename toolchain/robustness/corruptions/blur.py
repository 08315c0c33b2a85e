"""Blur family: defocus, glass, motion and zoom blur (ImageNet-C tables, sizes scaled)."""

from __future__ import annotations

import math
import random
from functools import lru_cache

import torch

from toolchain.robustness.corruptions import filters
from toolchain.robustness.corruptions.base import (
    Corruption,
    pick,
    rand_int16,
    register,
    spatial_scale,
    uniform,
)


@lru_cache(maxsize=32)  # five severities per table and size: built once, not per batch
def _disk_kernel(radius: float, alias_blur: float, supersample: int = 8) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a disk, then a small Gaussian to anti-alias it.

    Deviation: the disk is rasterised by area coverage (``supersample``^2 points per pixel)
    instead of the reference's all-or-nothing ``x^2 + y^2 <= r^2``, so that a radius scaled by
    image size (e.g. 0.875 px at 28x28) grows the kernel smoothly instead of jumping at integer
    radii. At the reference's radii the two agree closely.
    """
    reach = max(1, math.ceil(radius)) + 2  # the 3x3 / 5x5 anti-alias blur spreads 1-2 px further
    t = torch.arange(-reach, reach + 1, dtype=torch.float32)
    sub = (torch.arange(supersample, dtype=torch.float32) + 0.5) / supersample - 0.5
    fine = (t[:, None] + sub[None, :]).flatten()
    yy, xx = torch.meshgrid(fine, fine, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).float()
    side = t.numel()
    disk = inside.reshape(side, supersample, side, supersample).mean(dim=(1, 3))
    disk[reach, reach] = disk[reach, reach].clamp_min(1.0)  # the centre pixel is always in
    disk /= disk.sum()
    # ImageNet-C anti-aliases with a 3x3 kernel for radius <= 8, 5x5 above.
    k = torch.tensor(filters.gaussian_taps(alias_blur, truncate=1.0 if radius <= 8 else 2.0)).float()
    k = k[:, None] * k[None, :]
    kernel = torch.nn.functional.conv2d(disk[None, None], k[None, None], padding=k.shape[0] // 2)[0, 0]
    # Drop all-zero border rows/cols so the convolution stays as small as the blur really is.
    nz = torch.nonzero(kernel > 1e-7)
    (r0, c0), (r1, c1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    kernel = kernel[r0 : r1 + 1, c0 : c1 + 1]
    return kernel / kernel.sum()


@register
class DefocusBlur(Corruption):
    """Out-of-focus lens: convolution with an anti-aliased disk of the table's radius."""

    name, family = "defocus_blur", "blur"
    SMALL = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (radius, alias sigma)
    LARGE = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        radius, alias = pick(x, severity, self.SMALL, self.LARGE)
        s = spatial_scale(x)
        return filters.fft_filter2d(x, _disk_kernel(radius * s, alias * s))


_GUIDE_BITS = 12
_GUIDE = 1 << _GUIDE_BITS  # quantile-table resolution for sampling a displacement


@lru_cache(maxsize=16)
def _swap_displacements(delta: int, iterations: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pixel's final value comes from after ImageNet-C's sequential local swaps.

    The reference visits the pixels in reverse raster order and swaps each with a random
    neighbour ``(dy, dx)`` in ``[-delta, delta)^2``. Offsets lean up-left, towards pixels not yet
    visited, so a value is often carried several steps before it stops: the displacement is a
    random walk, much wider than one step. This simulates that process once (seeded, on a
    ``size`` x ``size`` grid) and returns a quantile table of the displacement ``source - pixel``
    measured away from the borders: ``(_GUIDE, 2)`` offsets ``(dy, dx)`` for a uniform draw
    ``j / _GUIDE``. Sampling one offset per pixel reproduces the displacement distribution (not
    the permutation: a value may be used twice), and needs a single gather.
    """
    rng = random.Random(1000 * delta + iterations)
    src = list(range(size * size))
    for _ in range(iterations):
        for h in range(size - delta, delta, -1):
            for w in range(size - delta, delta, -1):
                other = (h + rng.randrange(-delta, delta)) * size + w + rng.randrange(-delta, delta)
                here = h * size + w
                src[here], src[other] = src[other], src[here]
    grid = torch.tensor(src).view(size, size)
    margin = size // 4
    inner = grid[margin:-margin, margin:-margin]
    ys, xs = torch.meshgrid(
        torch.arange(margin, size - margin), torch.arange(margin, size - margin), indexing="ij"
    )
    dy, dx = (inner // size - ys).flatten(), (inner % size - xs).flatten()
    # The quantile table of the empirical distribution: sort the observed offsets by a key and
    # read the one at each uniform quantile.
    order = torch.argsort(dy * 4 * size + dx)
    pick_at = ((torch.arange(_GUIDE) + 0.5) / _GUIDE * order.numel()).long()
    chosen = order[pick_at]
    return dy[chosen], dx[chosen]


@register
class GlassBlur(Corruption):
    """Frosted glass: blur, locally scramble pixels, blur again (ImageNet-C).

    ImageNet-C scrambles with sequential swaps in a Python loop (see ``_swap_displacements``);
    here every pixel gathers from one displacement drawn from the distribution that process
    produces, in one vectorised step. Pixel displacements are scaled with ``spatial_scale``.
    """

    name, family = "glass_blur", "blur"
    SMALL = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, delta, iters
    LARGE = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        sigma, delta, iters = pick(x, severity, self.SMALL, self.LARGE)
        s = spatial_scale(x)
        n, c, h, w = x.shape
        offsets, base, reach = _glass_offsets(delta, iters, s, h, w, x.device)
        x = filters.gaussian_blur(x, sigma * s)
        # A uniform quantile index 0 .. _GUIDE - 1 from the top bits of a 16-bit draw.
        j = rand_int16((n, h * w), generator, x).int().add_(32768).bitwise_right_shift_(16 - _GUIDE_BITS)
        # Gathering from the edge-replicated image is the reference's clipping of coordinates,
        # and lets one flat offset per draw replace per-axis index arithmetic.
        src = offsets.index_select(0, j.flatten()).view(n, 1, h * w).add_(base)
        padded = filters.pad(x, reach, reach, reach, reach, "replicate").reshape(n, c, -1)
        x = torch.gather(padded, 2, src.expand(n, c, h * w))
        return filters.gaussian_blur(x.view(n, c, h, w), sigma * s)


@lru_cache(maxsize=32)
def _glass_offsets(
    delta: int, iterations: int, scale: float, h: int, w: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat gather offsets for glass blur on an ``h x w`` image padded by ``reach`` on every side.

    Returns ``(offsets, base, reach)``: ``offsets[j]`` is quantile ``j``'s displacement
    ``(round(dy * scale), round(dx * scale))`` as ``dy * (w + 2 reach) + dx``, ``base`` the
    padded flat index of every pixel, ``reach`` the largest scaled displacement.
    """
    table_dy, table_dx = _swap_displacements(delta, iterations)
    dy, dx = torch.round(table_dy * scale).long(), torch.round(table_dx * scale).long()
    reach = int(max(dy.abs().max(), dx.abs().max()))
    width = w + 2 * reach
    ys = torch.arange(reach, reach + h).view(h, 1) * width
    base = (ys + torch.arange(reach, reach + w).view(1, w)).flatten()
    return (dy * width + dx).to(device), base.to(device), reach


@register
class MotionBlur(Corruption):
    """Camera shake: ImageMagick-style one-sided motion blur at a random angle in [-45, 45] deg."""

    name, family = "motion_blur", "blur"
    SMALL = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # (radius, sigma)
    LARGE = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        radius, sigma = pick(x, severity, self.SMALL, self.LARGE)
        s = spatial_scale(x)
        angle = uniform((x.shape[0],), -45.0, 45.0, generator, x)
        return filters.motion_blur(x, radius * s, sigma * s, angle)


@register
class ZoomBlur(Corruption):
    """Forward motion: the mean of the image and its centre zooms (factors from the table)."""

    name, family = "zoom_blur", "blur"
    chunk_bytes = 1 << 20  # ~40 passes per zoom factor: the smaller the chunk, the more stays cached
    # (step, count): factors 1, 1+step, ..., exactly as many as the reference's
    # np.arange(1, end, step) yields, float rounding included (arange(1, 1.11, 0.01) has 12).
    SMALL = ((0.01, 7), (0.01, 12), (0.01, 16), (0.01, 21), (0.01, 26))
    LARGE = ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        step, count = pick(x, severity, self.SMALL, self.LARGE)
        return filters.zoom_blur(x, [1 + k * step for k in range(count)])
