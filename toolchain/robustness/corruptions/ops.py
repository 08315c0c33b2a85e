"""Batched image operations shared by the corruptions (all torch, any device, no Python pixel loops)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions.base import rand

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY and JPEG use


def luminance(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` luma; a one-channel batch is its own luminance."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def tint(color: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """A ``(1, C, 1, 1)`` colour for ``x``: the RGB triple, or its luma for one-channel batches."""
    if x.shape[1] == 3:
        return torch.tensor(color, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = sum(c * w for c, w in zip(color, _LUMA))
    return torch.full((1, x.shape[1], 1, 1), grey, dtype=x.dtype, device=x.device)


_POISSON_LEVELS = 256  # the input is read as 8-bit levels, as the reference receives it
_POISSON_GUIDE = 4096  # guide-table bins per level: most draws need no correction step


@lru_cache(maxsize=10)  # 4 MiB each: the five severities of both tables
def _poisson_tables(photons: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per 8-bit level ``l`` (mean ``l / 255 * photons``): the Poisson CDF and a guide table.

    Returns ``(cdf, guide, k)``: ``cdf`` is ``(levels * k,)`` with ``cdf[l*k + c] = P(X <= c)``
    (the last entry of each row raised above 1 so every search stops), ``guide`` is
    ``(levels * M,)`` with the count ``#{c: cdf_l(c) <= j / M}``, the exact sample for a uniform
    draw at the left edge of bin ``j``.
    """
    lam = torch.arange(_POISSON_LEVELS, dtype=torch.float64) * (photons / (_POISSON_LEVELS - 1))
    k = int(photons + 12 * math.sqrt(photons) + 16)  # the mass beyond is below 1e-12
    c = torch.arange(k, dtype=torch.float64)
    logp = c * lam[:, None].clamp_min(1e-300).log() - lam[:, None] - torch.lgamma(c + 1)
    pmf = torch.where(lam[:, None] > 0, logp.exp(), (c == 0).double().expand(_POISSON_LEVELS, k))
    cdf = pmf.cumsum(1).float()
    cdf[:, -1] = 2.0
    edges = torch.arange(_POISSON_GUIDE, dtype=torch.float32) / _POISSON_GUIDE
    guide = torch.searchsorted(cdf, edges.expand(_POISSON_LEVELS, -1).contiguous(), right=True)
    return cdf.flatten().to(device), guide.flatten().int().to(device), k


def poisson_levels(x: torch.Tensor, photons: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon counts with mean ``x * photons``, ``x`` read as 8-bit levels (exact sampling).

    Inverse-CDF sampling: one uniform draw per value (CPU generator, so CPU and GPU agree), a
    guide-table lookup that is already the answer for most draws, and correction steps
    (``count += u >= CDF(count)``) on the subset of draws that landed in a bin holding a CDF step.
    Quantising the mean to 256 levels is what the reference does too: it only takes uint8
    images. Returns float counts on ``x``'s device.
    """
    cdf, guide, k = _poisson_tables(float(photons), x.device)
    level = torch.round(x.clamp(0, 1).flatten() * (_POISSON_LEVELS - 1)).int()
    u = rand((x.numel(),), generator, x)
    count = guide.index_select(
        0, level * _POISSON_GUIDE + (u * _POISSON_GUIDE).int().clamp_(max=_POISSON_GUIDE - 1)
    )
    row = level * k
    todo = torch.nonzero(u >= cdf.index_select(0, row + count)).flatten()
    while todo.numel():  # the rare draws deep in a tail: only those are touched
        count[todo] += 1
        still = u[todo] >= cdf.index_select(0, row[todo] + count[todo])
        todo = todo[still]
    return count.view(x.shape).float()


def fractal_noise(
    n: int,
    size: tuple[int, int],
    generator: torch.Generator,
    like: torch.Tensor,
    base_cells: int = 3,
    octaves: int = 4,
    persistence: float = 0.5,
    channels: int = 1,
) -> torch.Tensor:
    """Multi-octave value noise ``(n, channels, H, W)``, each image and channel spanning [0, 1].

    Built as a pyramid: the coarse lattice is upsampled and the next octave's lattice added,
    so only the last step is a full-size (bilinear: 5x cheaper than bicubic) resize, whatever
    the number of octaves.
    """
    cells = base_cells
    field = rand((n, channels, cells + 1, cells + 1), generator, like)
    amp = 1.0
    for _ in range(1, octaves):
        cells = min(cells * 2, max(size))
        amp *= persistence
        field = F.interpolate(field, size=(cells + 1, cells + 1), mode="bilinear", align_corners=True)
        field = field + amp * rand((n, channels, cells + 1, cells + 1), generator, like)
    field = F.interpolate(field, size=size, mode="bilinear", align_corners=True)
    return normalise(field)


def normalise(field: torch.Tensor) -> torch.Tensor:
    """Rescale each map to span [0, 1]: per image and channel for ``(N, C, H, W)``, else per image."""
    flat = field.flatten(2) if field.dim() == 4 else field.flatten(1)
    shape = (*flat.shape[:-1], *([1] * (field.dim() - flat.dim() + 1)))
    lo = flat.min(dim=-1).values.view(shape)
    hi = flat.max(dim=-1).values.view(shape)
    return (field - lo) / (hi - lo).clamp_min(1e-8)


def plasma_fractal(
    n: int, mapsize: int, decay: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Diamond-square height maps ``(n, mapsize, mapsize)`` in [0, 1], batched over images.

    Same recurrence as ImageNet-C's ``plasma_fractal`` (wibble starts at 100 and is divided by
    ``decay`` per level, toroidal wrap via ``roll``), but every level runs on the whole batch at
    once. The random draws do not depend on ``decay``, so severities share the same cloud shape.
    """
    m = torch.zeros(n, mapsize, mapsize, device=like.device)
    step, wibble = mapsize, 100.0

    def wibbled(total: torch.Tensor) -> torch.Tensor:  # total / 4 + wibble^2 * U(-1, 1), in place
        w2 = wibble**2
        return rand(total.shape, generator, like).mul_(2 * w2).sub_(w2).add_(total, alpha=0.25)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = wibbled(sq.add_(sq.roll(-1, 2)))
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        lt = centres + centres.roll(1, 1)
        m[:, 0::step, half::step] = wibbled(lt.add_(corners).add_(corners.roll(-1, 2)))
        tt = centres + centres.roll(1, 2)
        m[:, half::step, 0::step] = wibbled(tt.add_(corners).add_(corners.roll(-1, 1)))
        step, wibble = half, wibble / decay
    return normalise(m)


def next_pow2(v: int) -> int:
    """Smallest power of two >= ``v``."""
    return 1 << max(0, math.ceil(math.log2(v)))


def warp(x: torch.Tensor, grid: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Sample ``x`` at pixel coordinates ``grid`` ``(N, H, W, 2)`` (x, y order), bilinear."""
    h, w = x.shape[-2:]
    # Contiguous on purpose: grid_sample runs ~3x slower on a permuted (strided) grid.
    norm = torch.empty(grid.shape, dtype=grid.dtype, device=grid.device)
    norm[..., 0] = (2 * grid[..., 0] + 1) / w - 1  # align_corners=False pixel-centre convention
    norm[..., 1] = (2 * grid[..., 1] + 1) / h - 1
    return F.grid_sample(x, norm, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def pixel_grid(n: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 2)`` pixel coordinates (x, y) of every output pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=like.device, dtype=torch.float32),
        torch.arange(w, device=like.device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1).expand(n, h, w, 2)


def soft_disc(
    h: int, w: int, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """``(N, 1, H, W)`` Gaussian blobs centred at pixel ``(cx, cy)`` with std ``radius`` (all ``(N,)``)."""
    ys = torch.arange(h, device=like.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=like.device, dtype=torch.float32).view(1, 1, 1, w)
    d2 = (xs - cx.view(-1, 1, 1, 1)) ** 2 + (ys - cy.view(-1, 1, 1, 1)) ** 2
    return torch.exp(-d2 / (2 * radius.view(-1, 1, 1, 1) ** 2))
