"""Batched image operations shared by the corruptions (all torch, any device, no Python pixel loops)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions import kernels
from toolchain.robustness.corruptions.base import rand

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY and JPEG use


def luminance(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` luma; a one-channel batch is its own luminance."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    # Three fused passes over one plane: twice as fast as a weighted sum over the channel dim.
    out = torch.mul(x[:, :1], _LUMA[0])
    out.add_(x[:, 1:2], alpha=_LUMA[1])
    return out.add_(x[:, 2:3], alpha=_LUMA[2])


def tint(color: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """A ``(1, C, 1, 1)`` colour for ``x``: the RGB triple, or its luma for one-channel batches."""
    if x.shape[1] == 3:
        return torch.tensor(color, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = sum(c * w for c, w in zip(color, _LUMA))
    return torch.full((1, x.shape[1], 1, 1), grey, dtype=x.dtype, device=x.device)


_POISSON_LEVELS = 256  # the input is read as 8-bit levels, as the reference receives it


@lru_cache(maxsize=10)  # the five severities of both tables, ~0.2 MiB each
def _poisson_alias(photons: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Walker alias tables of ``Poisson(l / 255 * photons)`` for every 8-bit level ``l``.

    Returns ``(prob, alias, k)``, both ``(levels * k,)`` float32: row ``l`` holds level ``l``'s
    outcomes ``0 .. k - 1`` (``k`` reaches 12 standard deviations past the largest mean, the
    mass beyond is below 1e-12 and is renormalised away). Picking slot ``c`` of a row uniformly,
    keeping ``c`` with probability ``prob[l*k + c]`` and taking ``alias[l*k + c]`` otherwise
    draws every outcome with exactly its probability (Vose's construction).
    """
    k = int(photons + 12 * math.sqrt(photons) + 16)
    lam = torch.arange(_POISSON_LEVELS, dtype=torch.float64)[:, None] * (photons / (_POISSON_LEVELS - 1))
    c = torch.arange(k, dtype=torch.float64)
    logp = c * lam.clamp_min(1e-300).log() - lam - torch.lgamma(c + 1)
    pmf = torch.where(lam > 0, logp.exp(), (c == 0).double().expand(_POISSON_LEVELS, k))
    scaled = (pmf / pmf.sum(1, keepdim=True) * k).tolist()
    prob = [[1.0] * k for _ in range(_POISSON_LEVELS)]
    alias = [list(range(k)) for _ in range(_POISSON_LEVELS)]
    for level, row in enumerate(scaled):
        small = [i for i in range(k) if row[i] < 1]
        large = [i for i in range(k) if row[i] >= 1]
        while small and large:  # pair an under-full slot with an over-full outcome
            s, g = small.pop(), large.pop()
            prob[level][s], alias[level][s] = row[s], g
            row[g] += row[s] - 1
            (small if row[g] < 1 else large).append(g)
    flat = (torch.tensor(t, dtype=torch.float32).flatten().to(device) for t in (prob, alias))
    return next(flat), next(flat), k


def poisson_levels(x: torch.Tensor, photons: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon counts with mean ``x * photons``, ``x`` read as 8-bit levels (exact sampling).

    Alias sampling: one uniform draw per value (CPU generator, so CPU and GPU agree) picks a
    slot of the level's table (its integer part) and decides between the slot and its alias
    (its fractional part): two table lookups, no search and no loop. Quantising the mean to 256
    levels is what the reference does too: it only takes uint8 images. Returns float counts on
    ``x``'s device.
    """
    prob, alias, k = _poisson_alias(float(photons), x.device)
    if kernels.usable(x):  # one pass
        return kernels.poisson_alias(x.contiguous(), rand(x.shape, generator, x), prob, alias, k)
    row = x.clamp(0, 1).mul_(_POISSON_LEVELS - 1).round_().mul_(k)
    v = rand(x.shape, generator, x).mul_(k)
    slot = v.floor().clamp_(max=k - 1)
    idx = row.add_(slot).int().flatten()
    keep = v.sub_(slot).flatten() < prob.index_select(0, idx)  # v - slot: uniform in [0, 1)
    return torch.where(keep, slot.flatten(), alias.index_select(0, idx)).view(x.shape)


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
    lo = flat.amin(dim=-1).view(shape)
    hi = flat.amax(dim=-1).view(shape)
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


def warp_by(x: torch.Tensor, shift: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """``warp`` at every pixel's own coordinates plus ``shift`` ``(N, 2, H, W)`` (dx, dy), bilinear.

    The normalised grid is built in one pass (cached pixel-centre grid + shift times the
    normalising scale) instead of adding the shift to pixel coordinates and normalising them.
    """
    h, w = shift.shape[-2:]
    if kernels.usable(x, shift) and padding_mode == "reflection":  # the same numbers, 1.4x faster
        return kernels.warp_reflect(x.contiguous(), shift.contiguous())
    base, scale = _normalised_grid(h, w, shift.device, shift.dtype)
    norm = torch.addcmul(base, shift.permute(0, 2, 3, 1), scale)  # (N, H, W, 2), contiguous
    return F.grid_sample(x, norm, mode="bilinear", padding_mode=padding_mode, align_corners=False)


@lru_cache(maxsize=16)
def _normalised_grid(
    h: int, w: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in ``grid_sample``'s [-1, 1] coordinates ``(H, W, 2)``, and px -> unit scale."""
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    scale = torch.tensor([2 / w, 2 / h], dtype=torch.float64)
    return base.to(device, dtype), scale.to(device, dtype)


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
