"""The numba-compiled CPU kernels behind :mod:`kernels` (imported on the first kernel call).

Importing numba costs ~0.15 s, so this module is only loaded by ``kernels`` when a kernel is
first needed; everything here is compiled on first use and cached on disk beside the module.
Every kernel releases the GIL and works on float32 C-contiguous arrays, writes only its output,
and keeps its working rows small enough to stay in the L1/L2 cache. The JPEG round trip has
its own module, ``_numba_jpeg``, built on ``jit`` and ``f32`` from here.
"""

from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True, error_model="numpy")  # the decorator of every kernel
f32 = np.float32  # constants must be float32 too: a float64 one promotes a whole loop to float64


@jit
def zoom_planes(
    planes: np.ndarray,
    out: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    fr: np.ndarray,
    c0: np.ndarray,
    c1: np.ndarray,
    fc: np.ndarray,
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """``out[p] = (planes[p] + sum_z zoom_z(planes[p])) / (Z + 1)`` for every plane ``p``.

    ``r0, r1, fr``: ``(Z, H)`` source rows and lerp weights per factor; ``c0, c1, fc``: ``(Z, W)``
    the same for columns. The lerp is ``a + f (b - a)``, as ``torch.lerp`` below weight 0.5.
    One output row at a time is built for every factor: the row resampling lands in a buffer
    that stays in L1, the column resampling reads it and adds into the output row.
    """
    count = f32(r0.shape[0] + 1)
    h, w = planes.shape[1], planes.shape[2]
    row = np.empty(w, dtype=np.float32)
    col = np.empty(w, dtype=np.float32)
    acc = np.empty(w, dtype=np.float32)
    for p in range(planes.shape[0]):
        x = planes[p]
        for i in range(h):
            for j in range(w):
                acc[j] = x[i, j]
            for z in range(r0.shape[0]):
                ra, rb, f = r0[z, i], r1[z, i], fr[z, i]
                for j in range(w):  # contiguous: vectorised
                    row[j] = x[ra, j] + f * (x[rb, j] - x[ra, j])
                for j in range(w):  # the gathers, on a row that sits in L1
                    u = row[c0[z, j]]
                    col[j] = u + fc[z, j] * (row[c1[z, j]] - u)
                for j in range(w):
                    acc[j] += col[j]
            for j in range(w):
                out[p, i, j] = acc[j] / count


@jit
def separable_planes(
    planes: np.ndarray,
    out: np.ndarray,
    rows: np.ndarray,
    taps_v: np.ndarray,
    cols: np.ndarray,
    taps_h: np.ndarray,
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """Separable correlation of every plane ``(H, W)``: ``taps_v`` down the columns, then ``taps_h``
    along the rows, one output row at a time.

    ``rows``: ``(H, Tv)`` source row of each output row and vertical tap, border already folded
    in; ``cols``: ``(W + Th - 1,)`` source column of each position of the row extended by the
    horizontal radius on both sides. The vertical sum lands in the middle of an extended row
    buffer (L1), its margins are filled through ``cols``, and the horizontal taps read shifted
    slices of it: every loop is a contiguous, vectorised one.
    """
    w = planes.shape[2]
    tv, th = taps_v.shape[0], taps_h.shape[0]
    r = (th - 1) // 2
    ext = np.empty(w + th - 1, dtype=np.float32)
    inner = ext[r : r + w]
    for p in range(planes.shape[0]):
        x = planes[p]
        for i in range(planes.shape[1]):
            src, c = x[rows[i, 0]], taps_v[0]
            for j in range(w):
                inner[j] = c * src[j]
            for t in range(1, tv):
                src, c = x[rows[i, t]], taps_v[t]
                for j in range(w):
                    inner[j] += c * src[j]
            for k in range(r):
                ext[k] = inner[cols[k]]
                ext[r + w + k] = inner[cols[r + w + k]]
            dst, c = out[p, i], taps_h[0]
            for j in range(w):
                dst[j] = c * ext[j]
            for t in range(1, th):
                c = taps_h[t]
                for j in range(w):
                    dst[j] += c * ext[j + t]


@jit
def shifted_sum(
    x: np.ndarray, out: np.ndarray, oy: np.ndarray, ox: np.ndarray, weights: np.ndarray
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """``out[b] = sum_t weights[t] * x[b]`` shifted by ``(oy[b, t], ox[b, t])``, edges replicated.

    ``x``, ``out``: ``(N, C, H, W)``; ``oy``, ``ox``: ``(N, T)`` whole-pixel offsets per image
    (the sample for output ``(i, j)`` is read at ``(i + oy, j + ox)``, clamped into the image).
    Each output row is accumulated in L1 from one source row per tap: the clamped columns at
    either end are constant runs, the rest a contiguous shifted slice.
    """
    h, w = x.shape[2], x.shape[3]
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane = x[b, c]
            for i in range(h):
                dst = out[b, c, i]
                for j in range(w):
                    dst[j] = f32(0.0)
                for t in range(weights.shape[0]):
                    src, dx, wt = plane[min(max(i + oy[b, t], 0), h - 1)], ox[b, t], weights[t]
                    lo = min(max(-dx, 0), w)  # j < lo reads column 0
                    hi = max(min(w - dx, w), lo)  # j >= hi reads column w - 1
                    first, last = wt * src[0], wt * src[w - 1]
                    for j in range(lo):
                        dst[j] += first
                    # views, so that no index can be negative (numba would wrap it around
                    # per element, which keeps the loop from vectorising: 4x slower)
                    inner, shifted = dst[lo:hi], src[lo + dx : hi + dx]
                    for j in range(hi - lo):
                        inner[j] += wt * shifted[j]
                    for j in range(hi, w):
                        dst[j] += last


@jit
def poisson_alias(
    x: np.ndarray, u: np.ndarray, out: np.ndarray, prob: np.ndarray, alias: np.ndarray, k: int
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """Poisson counts by alias sampling, in one pass: ``ops.poisson_levels``'s arithmetic (float32,
    the same draws ``u`` in [0, 1)) on flat arrays, ``x`` read as 8-bit levels."""
    kf, top, levels = f32(k), f32(k - 1), f32(255.0)
    for j in range(x.shape[0]):
        row = np.rint(min(max(x[j], f32(0.0)), f32(1.0)) * levels) * kf
        v = u[j] * kf
        slot = min(np.floor(v), top)
        idx = np.uint32(row + slot)
        keep, other = prob[idx], alias[idx]  # both loaded: a select, not an unpredictable branch
        out[j] = slot if v - slot < keep else other


@jit
def _reflect(v: float, size: int) -> float:  # pragma: no cover - compiled
    """``grid_sample``'s reflection padding (``align_corners=False``): ``v`` mirrored about -0.5
    and ``size - 0.5``, then clipped to ``[0, size - 1]``."""
    a = abs(v + f32(0.5))
    flips = np.floor(a / size)
    extra = a - flips * size
    r = extra - f32(0.5) if flips % 2 == 0 else size - extra - f32(0.5)
    return min(max(r, f32(0.0)), f32(size - 1))


@jit
def warp_reflect(
    x: np.ndarray, out: np.ndarray, field: np.ndarray
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """Bilinear resampling of ``x`` ``(N, C, H, W)`` at every pixel's position plus ``field``
    ``(N, 2, H, W)`` (dx, dy), reflection padding: ``F.grid_sample``'s numbers without its grid.

    Per output row the source positions, corner indices and weights are computed once (a
    vectorised loop) and shared by every channel's four-corner gather.
    """
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    flat = x.reshape(x.shape[0], c, h * w)
    # unsigned, so numba adds no negative-index wraparound to each gather
    corner = np.empty(w, dtype=np.uint32)  # flat index of the top-left corner
    right = np.empty(w, dtype=np.uint32)  # +1, or 0 on the last column
    down = np.empty(w, dtype=np.uint32)  # +w, or 0 on the last row
    ax, ay = np.empty(w, dtype=np.float32), np.empty(w, dtype=np.float32)
    for b in range(x.shape[0]):
        for i in range(h):
            fx, fy = field[b, 0, i], field[b, 1, i]
            for j in range(w):
                sx, sy = _reflect(j + fx[j], w), _reflect(i + fy[j], h)
                cx, cy = np.int32(sx), np.int32(sy)  # sx, sy >= 0: truncation is the floor
                ax[j], ay[j] = sx - cx, sy - cy
                corner[j] = cy * w + cx
                right[j] = 1 if cx < w - 1 else 0
                down[j] = w if cy < h - 1 else 0
            for ch in range(c):
                p, dst = flat[b, ch], out[b, ch, i]
                for j in range(w):
                    k, r, d = corner[j], right[j], down[j]
                    top = p[k] + ax[j] * (p[k + r] - p[k])
                    bottom = p[k + d] + ax[j] * (p[k + d + r] - p[k + d])
                    dst[j] = top + ay[j] * (bottom - top)
