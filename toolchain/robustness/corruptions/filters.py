"""Linear filters and resamplings shared by the corruptions, written for speed on large batches.

Each picks the cheapest exact form for its kernel (all torch, any device, no pixel loops):

- short separable kernels: shifted slices of a border-padded batch, multiplied and added
  (a 13-tap blur costs ~13 streaming passes, no index tensors);
- long separable kernels (longer than ``_SHIFT_ADD_MAX_TAPS`` or than the image): a cached
  ``(n, n)`` filter matrix per axis, i.e. two matrix products;
- on CPU with numba, Gaussian blurs instead go through a compiled kernel (one output row at a
  time, the taps applied in L1) up to ``_FFT_MIN_TAPS`` taps, and an FFT along the axis beyond;
- dense 2-D kernels (defocus discs): one FFT convolution of the border-padded batch, at an
  FFT size that is a multiple of 16 where that costs little (odd sizes are slow);
- per-image shift patterns (motion blur): shifted slices of one padded copy, per image and tap;
- centre zooms (zoom blur): per group of factors, two row gathers plus a lerp per axis,
  accumulated plane by plane so the passes stay in the CPU cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise

import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions import kernels

_SHIFT_ADD_MAX_TAPS = 31  # beyond this a (cached) filter matrix is cheaper than one pass per tap


def fold(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
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


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Extend ``(..., H, W)`` by the given margins with border ``mode`` (margins may exceed the image)."""
    h, w = x.shape[-2:]
    fits = max(top, bottom) < h and max(left, right) < w
    if mode == "replicate" or (mode == "reflect101" and fits):
        torch_mode = "replicate" if mode == "replicate" else "reflect"
        flat = x.reshape(-1, 1, h, w)
        out = F.pad(flat, (left, right, top, bottom), mode=torch_mode)
        return out.reshape(*x.shape[:-2], h + top + bottom, w + left + right)
    if mode == "symmetric" and fits:  # mirrored edge strips: cheaper than gathering every pixel
        x = torch.cat([x[..., :top, :].flip(-2), x, x[..., h - bottom :, :].flip(-2)], -2)
        return torch.cat([x[..., :left].flip(-1), x, x[..., w - right :].flip(-1)], -1)
    rows = fold(torch.arange(-top, h + bottom, device=x.device), h, mode)
    cols = fold(torch.arange(-left, w + right, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


@lru_cache(maxsize=128)
def _filter_matrix(n: int, taps: tuple[float, ...], mode: str, device: torch.device) -> torch.Tensor:
    """``(n, n)`` matrix applying the centred 1-D correlation ``taps`` with border ``mode``."""
    k = torch.tensor(taps, dtype=torch.float64)
    r = (k.numel() - 1) // 2
    src = fold(torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :], n, mode)
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.scatter_add_(1, src, k.expand(n, -1).contiguous())
    return mat.float().to(device)


def _shift_add(padded: torch.Tensor, taps: Sequence[float], size: int, dim: int) -> torch.Tensor:
    """Correlate along ``dim`` of an already padded tensor: sum of ``tap * slice``."""
    out = padded.narrow(dim, 0, size) * taps[0]
    for i, tap in enumerate(taps[1:], start=1):
        out.add_(padded.narrow(dim, i, size), alpha=tap)
    return out


def filter_1d(x: torch.Tensor, taps: Sequence[float], dim: int, mode: str) -> torch.Tensor:
    """Correlate ``(..., H, W)`` along ``dim`` (-2 or -1) with odd-length ``taps``, border ``mode``."""
    n, r = x.shape[dim], (len(taps) - 1) // 2
    if len(taps) > _SHIFT_ADD_MAX_TAPS or r >= n:
        mat = _filter_matrix(n, tuple(float(t) for t in taps), mode, x.device)
        return mat @ x if dim == -2 else x @ mat.T
    padded = pad(x, r, r, 0, 0, mode) if dim == -2 else pad(x, 0, 0, r, r, mode)
    return _shift_add(padded, [float(t) for t in taps], n, dim)


def gaussian_taps(sigma: float, truncate: float = 4.0) -> list[float]:
    """Normalised 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy's convention)."""
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return (k / k.sum()).tolist()


def gaussian_blur(
    x: torch.Tensor,
    sigma: float | tuple[float, float],
    truncate: float = 4.0,
    mode: str = "replicate",
) -> torch.Tensor:
    """Gaussian blur of ``(..., H, W)``; ``sigma`` is one value or ``(sigma_y, sigma_x)``.

    The default border is edge replication (skimage's ``mode='nearest'``).
    """
    sy, sx = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    taps_v = gaussian_taps(sy, truncate) if sy > 0 else [1.0]
    taps_h = gaussian_taps(sx, truncate) if sx > 0 else [1.0]
    if not kernels.usable(x):
        for taps, dim in ((taps_v, -2), (taps_h, -1)):
            x = filter_1d(x, taps, dim, mode) if len(taps) > 1 else x
        return x
    # On CPU: the compiled kernel, O(taps) per pixel, up to _FFT_MIN_TAPS; an FFT along the axis
    # beyond (O(log side)). The filter matrices cost O(side): elastic's 117-tap field blur took
    # 290 ms per 1080p frame that way, and dirty_lens' 617-tap smear 3x longer directly than by FFT.
    if len(taps_v) > _FFT_MIN_TAPS:
        x, taps_v = fft_filter_1d(x, taps_v, -2, mode), [1.0]
    if len(taps_h) > _FFT_MIN_TAPS:
        x, taps_h = fft_filter_1d(x, taps_h, -1, mode), [1.0]
    if len(taps_v) == len(taps_h) == 1:
        return x
    h, w = x.shape[-2:]
    return kernels.separable(x.contiguous(), _separable_tables(h, w, tuple(taps_v), tuple(taps_h), mode))


_FFT_MIN_TAPS = 200  # measured crossover on one core at 1080p: 161 taps 104 vs 168 ms, 281 taps 194 vs 115


def fft_filter_1d(x: torch.Tensor, taps: Sequence[float], dim: int, mode: str) -> torch.Tensor:
    """Correlate ``(..., H, W)`` along ``dim`` with odd-length ``taps`` by FFT, border ``mode``.

    The axis is padded by the radius on both sides, transformed at a fast size of at least the
    padded length (so the circular wrap-around stays out of the kept samples), multiplied by the
    flipped taps' transform and transformed back.
    """
    n, r = x.shape[dim], (len(taps) - 1) // 2
    padded = pad(x, r, r, 0, 0, mode).transpose(-1, -2) if dim == -2 else pad(x, 0, 0, r, r, mode)
    m = _fast_size(n + 2 * r)
    flipped = torch.tensor(list(taps)[::-1], dtype=x.dtype, device=x.device)
    spectrum = torch.fft.rfft(padded, n=m, dim=-1).mul_(torch.fft.rfft(flipped, n=m))
    out = torch.fft.irfft(spectrum, n=m, dim=-1)[..., 2 * r : 2 * r + n]
    # contiguous: the strided view would make every later elementwise pass several times slower
    return (out.transpose(-1, -2) if dim == -2 else out).contiguous()


@lru_cache(maxsize=64)
def _separable_tables(
    h: int, w: int, taps_v: tuple[float, ...], taps_h: tuple[float, ...], mode: str
) -> tuple[torch.Tensor, ...]:
    """The compiled separable kernel's tables: folded source rows per output row and tap, the
    folded source column of every position of a row extended by the horizontal radius, the taps."""
    rv, rh = (len(taps_v) - 1) // 2, (len(taps_h) - 1) // 2
    rows = fold(torch.arange(h)[:, None] + torch.arange(-rv, rv + 1)[None, :], h, mode)
    cols = fold(torch.arange(-rh, w + rh), w, mode)
    return (
        rows.int().contiguous(),
        torch.tensor(taps_v, dtype=torch.float32),
        cols.int().contiguous(),
        torch.tensor(taps_h, dtype=torch.float32),
    )


@lru_cache(maxsize=64)
def _fast_size(n: int) -> int:
    """Smallest ``2^a 3^b 5^c >= n`` with ``a >= 4`` where that costs < 10 %: the fast FFT sizes.

    Odd sizes are slow for real FFTs (243 = 3^5 took twice as long as 240 or 256 at 224 px
    plus a 19-tap kernel), so a multiple of 16 is preferred when it is nearly as small.
    """
    smooth = [m for m in range(n, 2 * n + 1) if _is_smooth(m)]
    even = [m for m in smooth if m % 16 == 0 and m <= 1.1 * n]
    return even[0] if even else smooth[0]


def _is_smooth(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def fft_filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect101") -> torch.Tensor:
    """Correlate every ``(H, W)`` plane of ``x`` with a 2-D ``kernel`` (``cv2.filter2D`` semantics).

    The batch is padded by the kernel radius with border ``mode`` (cv2's default reflect-101),
    transformed once, multiplied by the kernel's transform and transformed back; the circular
    wrap-around lands in the padding, which is cropped.
    """
    kh, kw = kernel.shape
    ry, rx = kh // 2, kw // 2
    h, w = x.shape[-2:]
    padded = pad(x, ry, kh - 1 - ry, rx, kw - 1 - rx, mode)
    fh, fw = _fast_size(padded.shape[-2]), _fast_size(padded.shape[-1])
    taps = kernel.detach().to("cpu", torch.float64)
    key = (tuple(taps.flatten().tolist()), kh, kw, fh, fw, x.device, x.dtype)
    spectrum = torch.fft.rfft2(padded, s=(fh, fw)).mul_(_kernel_spectrum(*key))
    out = torch.fft.irfft2(spectrum, s=(fh, fw))
    return out[..., ry : ry + h, rx : rx + w]


@lru_cache(maxsize=32)
def _kernel_spectrum(
    taps: tuple[float, ...], kh: int, kw: int, fh: int, fw: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The ``(fh, fw)`` real FFT of a ``kh x kw`` correlation kernel (given by its ``taps``)."""
    ry, rx = kh // 2, kw // 2
    # Correlation = convolution with the flipped kernel; rolled so its centre sits at (0, 0).
    k = torch.zeros(fh, fw, dtype=dtype, device=device)
    k[:kh, :kw] = torch.tensor(taps, dtype=dtype).view(kh, kw).flip(0, 1).to(device)
    return torch.fft.rfft2(k.roll((-(kh - 1 - ry), -(kw - 1 - rx)), (0, 1)))


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """One-sided motion blur along one angle per image (the reference's ``_motion_blur``).

    ``2*round(radius)+1`` taps at distance ``i`` along the angle, weighted
    ``exp(-i^2 / 2 sigma^2)`` (normalised), each sampling the edge-replicated image at the whole
    pixel offset ``ceil(i * (cos, sin) - 0.5)`` (y down). Taps below 1e-4 of the total weight are
    dropped: together they move no pixel by a visible amount. On CPU a compiled kernel sums the
    shifted rows of each output row in L1 (``kernels.shifted_sum``); elsewhere every tap is a
    shifted slice of one padded copy, one streaming pass per image and tap.
    """
    n, _, h, w = x.shape
    taps = 2 * max(0, round(radius)) + 1
    i = torch.arange(taps, dtype=torch.float64)
    weights = torch.exp(-(i**2) / (2.0 * max(sigma, 1e-6) ** 2))
    weights = weights / weights.sum()
    i, weights = i[weights >= 1e-4], weights[weights >= 1e-4]
    theta = torch.deg2rad(angle_deg.double().cpu())
    ox_t = torch.ceil(i[None, :] * torch.cos(theta)[:, None] - 0.5)
    oy_t = torch.ceil(i[None, :] * torch.sin(theta)[:, None] - 0.5)
    if kernels.usable(x):
        return kernels.shifted_sum(x.contiguous(), oy_t.int(), ox_t.int(), weights.float())
    ox, oy = ox_t.long().tolist(), oy_t.long().tolist()
    p = taps
    padded = pad(x, p, p, p, p, "replicate")
    out = torch.empty_like(x)
    for b in range(n):
        acc = out[b]
        acc.zero_()
        for dx, dy, wt in zip(ox[b], oy[b], weights.tolist()):
            acc.add_(padded[b, :, p + dy : p + dy + h, p + dx : p + dx + w], alpha=wt)
    return out


@lru_cache(maxsize=256)
def _zoom_rows(n: int, zoom: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows and lerp weight of a clipped centre zoom along one axis of length ``n``.

    The reference crops the central ``ceil(n / zoom)`` samples, resizes them with linear
    interpolation and corner-aligned grids (``scipy.ndimage.zoom``, order 1) to
    ``round(crop * zoom)`` samples, and keeps the first ``n``.
    """
    crop = math.ceil(n / zoom)
    start = (n - crop) // 2
    out_n = round(crop * zoom)
    pos = torch.arange(n, dtype=torch.float64) * ((crop - 1) / max(out_n - 1, 1))
    lo = pos.floor().clamp(0, crop - 1)
    frac = (pos - lo).float()
    lo = lo.long()
    hi = (lo + 1).clamp(max=crop - 1)
    return (lo + start).to(device), (hi + start).to(device), frac.to(device)


_ZOOM_PLANE_BYTES = 1 << 18  # planes per step: a 224 x 224 plane and its temporaries stay in cache
_ZOOM_GROUP = 6  # zoom factors resampled together: one gather, lerp and transpose per group


def zoom_blur(x: torch.Tensor, zooms: Sequence[float]) -> torch.Tensor:
    """Mean of ``x`` and its clipped centre zooms by each factor in ``zooms`` (ImageNet-C).

    Each zoom is separable: a lerp of two gathered rows, then (on the transposed planes) of two
    gathered columns; row gathers are the fast kind, so the columns are handled transposed and
    everything accumulates in the transposed layout. Every channel is zoomed the same way, so
    the work goes a few planes (``_ZOOM_PLANE_BYTES``) at a time: the passes then run in the
    CPU's cache instead of streaming through memory (~30 % faster at 224 px than whole images).
    Up to ``_ZOOM_GROUP`` factors share each step: their row indices are concatenated into one
    gather and the stacked results are transposed and column-gathered once (~10 % faster).
    """
    n, c, h, w = x.shape
    rounded = [round(z, 6) for z in zooms]
    if kernels.usable(x) and x.is_contiguous():
        return kernels.zoom_blur(x, _zoom_tables(h, w, tuple(rounded)))
    count = -(-len(rounded) // _ZOOM_GROUP)  # groups of equal size: 13 factors as 5 + 4 + 4
    bounds = [len(rounded) * i // count for i in range(count + 1)]
    groups = [_zoom_group(h, w, tuple(rounded[a:b]), x.device) for a, b in pairwise(bounds)]
    planes = x.reshape(n * c, h, w)
    out = torch.empty_like(planes)
    step = max(1, _ZOOM_PLANE_BYTES // max(1, h * w * x.element_size()))
    for start in range(0, n * c, step):
        part = planes[start : start + step]
        m = part.shape[0]
        acc_t = part.transpose(-1, -2).contiguous()
        for k, r0, r1, fr, c0, c1, fc in groups:
            rows = part.index_select(-2, r0).lerp_(part.index_select(-2, r1), fr)  # (m, k*h, w)
            rows_t = rows.view(m, k, h, w).transpose(-1, -2).reshape(m, k * w, h)
            cols = rows_t.index_select(-2, c0).lerp_(rows_t.index_select(-2, c1), fc)
            acc_t.add_(cols.view(m, k, w, h).sum(1))
        torch.div(acc_t.transpose(-1, -2), len(zooms) + 1, out=out[start : start + step])
    return out.view(n, c, h, w)


@lru_cache(maxsize=64)
def _zoom_tables(h: int, w: int, zooms: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """``(r0, r1, fr)`` as ``(Z, H)`` and ``(c0, c1, fc)`` as ``(Z, W)``, for the compiled kernel."""
    cpu = torch.device("cpu")
    rows = [_zoom_rows(h, z, cpu) for z in zooms]
    cols = [_zoom_rows(w, z, cpu) for z in zooms]
    out = []
    for tables in (rows, cols):
        for i, dtype in enumerate((torch.int32, torch.int32, torch.float32)):
            out.append(torch.stack([t[i] for t in tables]).to(dtype).contiguous())
    return tuple(out)


@lru_cache(maxsize=64)
def _zoom_group(h: int, w: int, zooms: tuple[float, ...], device: torch.device) -> tuple:
    """Concatenated row and column lerp tables of several zooms (the column indices address the
    stacked, transposed ``(k * w, h)`` results, hence an offset of ``w`` rows per factor)."""
    k = len(zooms)
    rows = [_zoom_rows(h, z, device) for z in zooms]
    cols = [_zoom_rows(w, z, device) for z in zooms]
    offset = (torch.arange(k, device=device) * w).repeat_interleave(w)
    r0, r1, fr = (torch.cat([t[i] for t in rows]) for i in range(3))
    c0, c1, fc = (torch.cat([t[i] for t in cols]) for i in range(3))
    return k, r0, r1, fr.view(k * h, 1), c0 + offset, c1 + offset, fc.view(k * w, 1)


@lru_cache(maxsize=64)
def _box_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL ``BOX`` downsampling ``n_in -> n_out`` as ``(taps, n_out)`` source indices and weights.

    Output ``j`` averages the source pixels whose centres fall in its footprint (PIL's box
    filter: ``-support <= d < support``); rows with fewer sources get zero-weight padding.
    """
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    d = (torch.arange(n_in, dtype=torch.float64) + 0.5)[None, :] - centre[:, None]
    inside = (d >= -support) & (d < support)
    count = inside.sum(1)
    first = inside.float().argmax(1)
    taps = int(count.max())
    idx = (first[None, :] + torch.arange(taps)[:, None]).clamp(max=n_in - 1)
    wts = (torch.arange(taps)[:, None] < count[None, :]).double() / count[None, :]
    return idx.to(device), wts.float().to(device)


def _box_down(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """BOX-downsample the rows (dim -2) of ``x`` to ``n_out``."""
    idx, wts = _box_taps(x.shape[-2], n_out, x.device)
    out = x.index_select(-2, idx[0]) * wts[0].view(-1, 1)
    for t in range(1, idx.shape[0]):
        out.addcmul_(x.index_select(-2, idx[t]), wts[t].view(-1, 1))
    return out


def _block_means(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` block means of ``(N, C, H, W)`` with both sides multiples of ``k``.

    PIL's BOX filter at an integer scale is exactly the block mean: row blocks are summed by a
    reduction over a middle dimension, column blocks by ``k`` strided slices, no index tables.
    """
    n, c, h, w = x.shape
    rows = x.reshape(n, c, h // k, k, w).sum(3)
    small = rows[..., 0::k].clone()
    for j in range(1, k):
        small.add_(rows[..., j::k])
    return small.mul_(1 / (k * k))


def pixelate(x: torch.Tensor, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """PIL ``BOX`` downsample to ``int(side * factor)``, then ``NEAREST`` upsample back, in [0, 1].

    The small image is clamped (box means of values in [0, 1] may round a hair outside), so the
    upsampling, which only copies values, writes the final result straight into ``out`` (a new
    tensor if None) in one pass.
    """
    n, c, h, w = x.shape
    sh, sw = max(1, int(h * factor)), max(1, int(w * factor))
    k = h // sh
    out = torch.empty_like(x) if out is None else out
    if k > 1 and sh * k == h and sw * k == w:  # an integer factor (e.g. 0.5, 0.25 at even sizes)
        small = _block_means(x, k).clamp_(0.0, 1.0)
        out.view(n, c, sh, k, sw, k).copy_(small.view(n, c, sh, 1, sw, 1).expand(n, c, sh, k, sw, k))
        return out
    return _pixelate_box(x, sh, sw, out)


def _pixelate_box(x: torch.Tensor, sh: int, sw: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``pixelate`` to ``(sh, sw)`` and back at any factor: BOX taps per axis, NEAREST upsampling."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x) if out is None else out
    small = _box_down(x, sh)  # rows
    small_t = _box_down(small.transpose(-1, -2).contiguous(), sw).clamp_(0.0, 1.0)  # columns, transposed
    # PIL's NEAREST upsampling takes source floor((j + 0.5) * n_small / n): torch's "nearest-exact",
    # whose out= overload writes the result where it is wanted.
    torch.ops.aten._upsample_nearest_exact2d.out(small_t.transpose(-1, -2), [h, w], None, None, out=out)
    return out
