"""Batched image operations shared by the corruptions (all torch, any device, no Python pixel loops)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions.base import rand, uniform

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


def _fold(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map out-of-range indices into ``[0, n)`` the way each border mode extends an image."""
    if mode == "replicate" or n == 1:  # a a a | a b c d | d d d   (skimage/scipy 'nearest')
        return idx.clamp(0, n - 1)
    if mode == "reflect101":  # d c b | a b c d | c b a   (cv2 default, BORDER_REFLECT_101)
        period = 2 * n - 2
        idx = idx % period
        return torch.where(idx >= n, period - idx, idx)
    if mode == "symmetric":  # c b a | a b c d | d c b   (scipy/skimage 'reflect')
        idx = idx % (2 * n)
        return torch.where(idx >= n, 2 * n - 1 - idx, idx)
    raise ValueError(f"unknown border mode {mode!r}")


@lru_cache(maxsize=256)
def _filter_matrix(n: int, taps: tuple[float, ...], mode: str) -> torch.Tensor:
    """``(n, n)`` matrix applying the centred 1-D correlation ``taps`` with border ``mode``.

    Filtering as a (cached) matrix product instead of a padded convolution: on small images
    it is several times faster on CPU, and it handles kernels wider than the image.
    """
    k = torch.tensor(taps, dtype=torch.float64)
    r = (k.numel() - 1) // 2
    src = _fold(torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :], n, mode)
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.scatter_add_(1, src, k.expand(n, -1).contiguous())
    return mat.float()


def separable_filter(
    x: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, mode: str = "replicate"
) -> torch.Tensor:
    """Correlate ``(..., H, W)`` with the outer product ``ky x kx`` (odd-length 1-D kernels)."""
    h, w = x.shape[-2:]
    my = _filter_matrix(h, tuple(ky.double().tolist()), mode).to(x.device)
    mx = _filter_matrix(w, tuple(kx.double().tolist()), mode).to(x.device)
    return my @ x @ mx.T


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect101") -> torch.Tensor:
    """Correlate each channel with a 2-D ``kernel`` (``cv2.filter2D`` with its default border).

    The kernel is split into rank-1 terms (SVD) so each is two small matrix products; blur
    kernels such as discs need only a few terms, dropped once below 1e-6 of the largest.
    """
    u, sv, vh = torch.linalg.svd(kernel.double())
    out = torch.zeros_like(x)
    for i in range(int((sv > sv[0] * 1e-6).sum())):
        root = sv[i].sqrt()
        out += separable_filter(x, u[:, i] * root, vh[i] * root, mode)
    return out


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``ceil(truncate * sigma)`` (skimage/scipy convention)."""
    radius = max(1, math.ceil(truncate * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def gaussian_blur(
    x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate"
) -> torch.Tensor:
    """Gaussian blur; default border is edge replication (skimage's ``mode='nearest'``)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-image integer shift: ``out[p] = x[p + (dx, dy)]``, border replicated.

    Args:
        x: ``(N, C, H, W)``.
        dx, dy: ``(N,)`` integer offsets in pixels.
    """
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy.view(n, 1, 1)).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx.view(n, 1, 1)).clamp(0, w - 1)
    idx = (rows * w + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, h * w), 2, idx).reshape(n, c, h, w)


def motion_blur(
    x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor, min_weight: float = 1e-3
) -> torch.Tensor:
    """ImageMagick-style one-sided motion blur, one angle per image.

    Like ``MagickMotionBlurImage``: ``2*ceil(radius)+1`` taps at distance ``i`` along the angle,
    offsets rounded to whole pixels, weighted ``exp(-i^2 / 2 sigma^2)``; taps below
    ``min_weight`` of the first are skipped (they change no 8-bit pixel).
    """
    taps = 2 * math.ceil(max(radius, 0.0)) + 1
    i = torch.arange(taps, dtype=torch.float32)
    wts = torch.exp(-(i**2) / (2.0 * max(sigma, 1e-6) ** 2))
    keep = wts >= min_weight
    i, wts = i[keep], wts[keep] / wts[keep].sum()
    theta = torch.deg2rad(angle_deg.float())
    cos, sin = torch.cos(theta).to(x.device), torch.sin(theta).to(x.device)
    out = torch.zeros_like(x)
    for dist, wt in zip(i.tolist(), wts.tolist()):
        if dist == 0:
            out += wt * x
        else:
            out += wt * translate(x, torch.round(dist * cos).long(), torch.round(-dist * sin).long())
    return out


def poisson(lam: torch.Tensor, generator: torch.Generator, exact_below: float = 20.0) -> torch.Tensor:
    """Poisson counts with mean ``lam``, drawn on the CPU generator, returned on ``lam``'s device.

    Exact where ``lam < exact_below``; above it the rounded normal N(lam, lam), which differs
    from Poisson by far less than one 8-bit level there and is ~10x cheaper than torch's
    sampler (shot noise on a batch is otherwise the slowest corruption).
    """
    lam_cpu = lam.detach().float().cpu().clamp_min(0)
    z = torch.randn(lam_cpu.shape, generator=generator)
    counts = torch.round(lam_cpu + lam_cpu.sqrt() * z).clamp_min_(0)
    small = lam_cpu < exact_below
    counts[small] = torch.poisson(lam_cpu[small], generator=generator)
    return counts.to(lam.device)


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
    so only the last step is a full-size (bicubic) resize, whatever the number of octaves.
    """
    cells = base_cells
    field = rand((n, channels, cells + 1, cells + 1), generator, like)
    amp = 1.0
    for _ in range(1, octaves):
        cells = min(cells * 2, max(size))
        amp *= persistence
        field = F.interpolate(field, size=(cells + 1, cells + 1), mode="bilinear", align_corners=True)
        field = field + amp * rand((n, channels, cells + 1, cells + 1), generator, like)
    field = F.interpolate(field, size=size, mode="bicubic", align_corners=True)
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
    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half::step, half::step] = sq / 4 + wibble**2 * uniform(sq.shape, -1, 1, generator, like)
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        lt = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        m[:, 0::step, half::step] = lt / 4 + wibble**2 * uniform(lt.shape, -1, 1, generator, like)
        tt = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        m[:, half::step, 0::step] = tt / 4 + wibble**2 * uniform(tt.shape, -1, 1, generator, like)
        step, wibble = half, wibble / decay
    return normalise(m)


def next_pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(v)))


@lru_cache(maxsize=64)
def _zoom_operator(h: int, w: int, zooms: tuple[float, ...]) -> torch.Tensor:
    """Sparse ``(H*W, H*W)`` matrix averaging the image with centre zooms by each factor.

    A clipped zoom by ``z`` samples the source at ``c + (p - c) / z``; bilinear weights to the four
    neighbours make it linear, so the whole zoom blur is one (cached) sparse matrix product.
    """
    rows, cols, vals = [], [], []
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    out_idx = (ys * w + xs).long().flatten()
    weight = 1.0 / (len(zooms) + 1)
    rows.append(out_idx)
    cols.append(out_idx)
    vals.append(torch.full((h * w,), weight, dtype=torch.float64))
    for z in zooms:
        sy = ((ys + 0.5 - h / 2) / z + h / 2 - 0.5).clamp(0, h - 1).flatten()
        sx = ((xs + 0.5 - w / 2) / z + w / 2 - 0.5).clamp(0, w - 1).flatten()
        y0, x0 = sy.floor().long(), sx.floor().long()
        y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
        fy, fx = sy - y0, sx - x0
        for yy, xx, wt in (
            (y0, x0, (1 - fy) * (1 - fx)),
            (y0, x1, (1 - fy) * fx),
            (y1, x0, fy * (1 - fx)),
            (y1, x1, fy * fx),
        ):
            rows.append(out_idx)
            cols.append(yy * w + xx)
            vals.append(weight * wt)
    op = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]),
        torch.cat(vals),
        (h * w, h * w),
        check_invariants=True,
    ).coalesce()
    return op.to(torch.float32)


def zoom_average(x: torch.Tensor, zooms: Sequence[float]) -> torch.Tensor:
    """Mean of ``x`` and its centre zooms by each factor in ``zooms`` (ImageNet-C zoom blur)."""
    n, c, h, w = x.shape
    op = _zoom_operator(h, w, tuple(round(z, 6) for z in zooms)).to(x.device)
    flat = x.reshape(n * c, h * w).t().contiguous()
    return (op @ flat).t().reshape(n, c, h, w)


def warp(x: torch.Tensor, grid: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Sample ``x`` at pixel coordinates ``grid`` ``(N, H, W, 2)`` (x, y order), bilinear."""
    h, w = x.shape[-2:]
    norm = torch.empty_like(grid)
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


def sparse_points(
    n: int, size: tuple[int, int], density: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """``(N, 1, H, W)`` binary map where each pixel is on with probability ``density``."""
    return (rand((n, 1, *size), generator, like) < density).float()
