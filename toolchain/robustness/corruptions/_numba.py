"""The numba-compiled CPU kernels behind :mod:`kernels` (imported on the first kernel call).

Importing numba costs ~0.15 s, so this module is only loaded by ``kernels`` when a kernel is
first needed; everything here is compiled on first use and cached on disk beside the module.
Every kernel releases the GIL and works on float32 C-contiguous arrays, writes only its output,
and keeps its working rows small enough to stay in the L1/L2 cache.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_F = np.float32


@_jit
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
    count = _F(r0.shape[0] + 1)
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


@_jit
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


@_jit
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
                    dst[j] = _F(0.0)
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


@_jit
def poisson_alias(
    x: np.ndarray, u: np.ndarray, out: np.ndarray, prob: np.ndarray, alias: np.ndarray, k: int
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """Poisson counts by alias sampling, in one pass: ``ops.poisson_levels``'s arithmetic (float32,
    the same draws ``u`` in [0, 1)) on flat arrays, ``x`` read as 8-bit levels."""
    kf, top, levels = _F(k), _F(k - 1), _F(255.0)
    for j in range(x.shape[0]):
        row = np.rint(min(max(x[j], _F(0.0)), _F(1.0)) * levels) * kf
        v = u[j] * kf
        slot = min(np.floor(v), top)
        idx = np.uint32(row + slot)
        keep, other = prob[idx], alias[idx]  # both loaded: a select, not an unpredictable branch
        out[j] = slot if v - slot < keep else other


@_jit
def _reflect(v: float, size: int) -> float:  # pragma: no cover - compiled
    """``grid_sample``'s reflection padding (``align_corners=False``): ``v`` mirrored about -0.5
    and ``size - 0.5``, then clipped to ``[0, size - 1]``."""
    a = abs(v + _F(0.5))
    flips = np.floor(a / size)
    extra = a - flips * size
    r = extra - _F(0.5) if flips % 2 == 0 else size - extra - _F(0.5)
    return min(max(r, _F(0.0)), _F(size - 1))


@_jit
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


# --------------------------------------------------------------------------- JPEG
#
# The 2-D block DCT works on strips of 8 rows: a "vertical" step applies an 8x8 matrix to the
# 8 rows (one long vectorised loop per output row), a block transpose turns each 8x8 block of
# the strip around, and the same vertical step then does the other axis. Coefficients come out
# transposed per block (``(v, u)`` at ``[v, 8 b + u]``), which the tiled quantisation tables
# follow; the inverse runs the same three steps with ``D.T``.


@_jit
def _vertical(src: np.ndarray, dst: np.ndarray, m: np.ndarray) -> None:  # pragma: no cover - compiled
    """``dst[u, :] = sum_k m[u, k] * src[k, :]`` for 8-row strips ``(8, L)``."""
    s0, s1, s2, s3, s4, s5, s6, s7 = src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7]
    for u in range(8):
        m0, m1, m2, m3 = m[u, 0], m[u, 1], m[u, 2], m[u, 3]
        m4, m5, m6, m7 = m[u, 4], m[u, 5], m[u, 6], m[u, 7]
        row = dst[u]
        for j in range(src.shape[1]):
            row[j] = (m0 * s0[j] + m1 * s1[j] + m2 * s2[j] + m3 * s3[j]) + (
                m4 * s4[j] + m5 * s5[j] + m6 * s6[j] + m7 * s7[j]
            )


@_jit
def _transpose_blocks(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - compiled
    """Every 8x8 block of the strip ``src`` transposed into ``dst``."""
    for b in range(0, src.shape[1], 8):
        for u in range(8):
            for k in range(8):
                dst[k, b + u] = src[u, b + k]


@_jit
def _block_codec(
    strip: np.ndarray, spare: np.ndarray, d: np.ndarray, dt: np.ndarray, inv_q: np.ndarray, q: np.ndarray
) -> None:  # pragma: no cover - compiled
    """DCT, quantise, dequantise and inverse-DCT the 8x8 blocks of ``strip`` ``(8, L)`` in place.

    ``spare``: scratch of the same shape; ``inv_q``, ``q``: ``(8, L)`` tables in the transposed
    coefficient layout (``Q.T`` tiled along the strip).
    """
    _vertical(strip, spare, d)
    _transpose_blocks(spare, strip)
    _vertical(strip, spare, d)
    for v in range(8):
        c, iq, qq = spare[v], inv_q[v], q[v]
        for j in range(strip.shape[1]):
            c[j] = np.rint(c[j] * iq[j]) * qq[j]
    _vertical(spare, strip, dt)
    _transpose_blocks(strip, spare)
    _vertical(spare, strip, dt)


@_jit
def _to_luma(
    red: np.ndarray, green: np.ndarray, blue: np.ndarray, top: int, to_ycc: np.ndarray, strip: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Level-shifted luma (``Y - 128``) of image rows ``top..top+7`` into ``strip``, rows past the
    image's last one and columns past its width replicating the last (libjpeg's MCU padding)."""
    h, w = red.shape
    y0, y1, y2, shift = to_ycc[0, 0], to_ycc[0, 1], to_ycc[0, 2], _F(128.0)
    for k in range(8):
        i, row = min(top + k, h - 1), strip[k]
        r, g, b = red[i], green[i], blue[i]
        for j in range(w):
            row[j] = y0 * r[j] + y1 * g[j] + y2 * b[j] - shift
        for j in range(w, strip.shape[1]):
            row[j] = row[w - 1]


@_jit
def _to_chroma(
    red: np.ndarray,
    green: np.ndarray,
    blue: np.ndarray,
    top: int,
    to_ycc: np.ndarray,
    pairs: np.ndarray,
    cb: np.ndarray,
    cr: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Cb and Cr of the 2x2 means of image rows ``top..top+7`` into the first 4 rows of ``cb`` and
    ``cr`` (without JFIF's +128, see ``jpeg.py``). The row pairs are summed into ``pairs``
    ``(3, W_padded)``, the column pairs inside the colour weights' loop; edges replicate."""
    h, w = red.shape
    for k in range(4):
        i0, i1 = min(top + 2 * k, h - 1), min(top + 2 * k + 1, h - 1)
        for c, plane in enumerate((red, green, blue)):
            upper, lower, s = plane[i0], plane[i1], pairs[c]
            for j in range(w):
                s[j] = upper[j] + lower[j]
            for j in range(w, pairs.shape[1]):
                s[j] = s[w - 1]
        sr, sg, sb = pairs[0], pairs[1], pairs[2]
        for t in range(1, 3):
            c0, c1, c2, row = to_ycc[t, 0], to_ycc[t, 1], to_ycc[t, 2], (cb if t == 1 else cr)[k]
            for j in range(cb.shape[1]):
                row[j] = (
                    c0 * (sr[2 * j] + sr[2 * j + 1])
                    + c1 * (sg[2 * j] + sg[2 * j + 1])
                    + c2 * (sb[2 * j] + sb[2 * j + 1])
                )


@_jit
def _emit_row(
    luma: np.ndarray,
    cb: np.ndarray,
    cb_near: np.ndarray,
    cr: np.ndarray,
    cr_near: np.ndarray,
    blend: np.ndarray,
    wide: np.ndarray,
    r: np.ndarray,
    g: np.ndarray,
    b: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """One decoded RGB row, 8-bit levels / 255: luma plus the fancy-upsampled chroma rows.

    ``cb``/``cr`` are the chroma rows the output row falls in and ``*_near`` the vertical
    neighbours on its side (libjpeg's triangle filter: ``3 near + far`` per axis, edges
    replicated at the image's own chroma width ``ceil(W / 2)``, as libjpeg does, not the padded
    one); ``blend`` ``(2, W_padded / 2)`` and ``wide`` ``(2, W_padded)``: scratch for the
    vertically blended and the upsampled Cb and Cr rows. Writes ``W = len(r)`` samples.
    """
    wc = (r.shape[0] + 1) // 2
    three, four = _F(3.0), _F(4.0)
    for p in range(2):
        a, near, row = (cb, cb_near, wide[0]) if p == 0 else (cr, cr_near, wide[1])
        v = blend[p]
        for j in range(wc):
            v[j] = three * a[j] + near[j]
        row[0] = four * v[0]
        for j in range(1, wc):
            row[2 * j] = three * v[j] + v[j - 1]
        for j in range(wc - 1):
            row[2 * j + 1] = three * v[j] + v[j + 1]
        row[2 * wc - 1] = four * v[wc - 1]
    kr, kgb, kgr, kb = _F(1.402 / 16), _F(-0.344136 / 16), _F(-0.714136 / 16), _F(1.772 / 16)
    lo, hi, scale = _F(0.0), _F(255.0), _F(1 / 255)
    blue, red = wide[0], wide[1]
    for j in range(r.shape[0]):
        y, u, v = luma[j], blue[j], red[j]
        r[j] = min(max(np.rint(y + kr * v), lo), hi) * scale
        g[j] = min(max(np.rint(y + kgb * u + kgr * v), lo), hi) * scale
        b[j] = min(max(np.rint(y + kb * u), lo), hi) * scale


@_jit
def jpeg_rgb(
    x: np.ndarray,
    out: np.ndarray,
    d: np.ndarray,
    dt: np.ndarray,
    luma_inv_q: np.ndarray,
    luma_q: np.ndarray,
    chroma_inv_q: np.ndarray,
    chroma_q: np.ndarray,
    to_ycc: np.ndarray,
) -> None:  # pragma: no cover - compiled; tests/test_corruptions.py checks its output
    """Baseline JPEG (YCbCr 4:2:0) round trip of ``x`` ``(N, 3, H, W)`` in [0, 1] into ``out``.

    ``out`` (same shape) receives 8-bit levels / 255, clamped. A partial MCU at the bottom or
    right edge is filled by replicating the last row and column, as libjpeg does (here on the
    fly, without a padded copy of the image).
    ``to_ycc``: the JFIF RGB->YCbCr weights times 255 (the chroma rows also times 1/4, the
    2x2 mean). The image goes in bands of one MCU row (16 rows): luma and chroma of band ``m``
    are coded, then the output rows of band ``m - 1``, whose lower chroma neighbour lies in
    band ``m``; decoded luma is kept for two bands and chroma for three (0.7 MiB of buffers
    for 1920-wide frames, none of them image-sized).
    """
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    hp, wp = (h + 15) // 16 * 16, (w + 15) // 16 * 16
    wc = wp // 2
    last = (h + 1) // 2 - 1  # the image's last chroma row: the upsampling replicates it, not padding
    bands = hp // 16
    luma = np.empty((32, wp), dtype=np.float32)  # image row i at i % 32
    chroma = np.empty((2, 24, wc), dtype=np.float32)  # chroma row i at i % 24
    strip, spare = np.empty((8, wp), dtype=np.float32), np.empty((8, wp), dtype=np.float32)
    cb, cr = np.empty((8, wc), dtype=np.float32), np.empty((8, wc), dtype=np.float32)
    cspare = np.empty((8, wc), dtype=np.float32)
    pairs = np.empty((3, wp), dtype=np.float32)
    blend, wide = np.empty((2, wc), dtype=np.float32), np.empty((2, wp), dtype=np.float32)
    shift = _F(128.0)
    for img in range(n):
        red, green, blue = x[img, 0], x[img, 1], x[img, 2]
        for band in range(bands + 1):
            if band < bands:
                top = 16 * band
                for half in range(2):
                    _to_luma(red, green, blue, top + 8 * half, to_ycc, strip)
                    # the chroma rows of these 8 image rows, while they are still in the cache
                    _to_chroma(
                        red, green, blue, top + 8 * half, to_ycc, pairs, cb[4 * half :], cr[4 * half :]
                    )
                    _block_codec(strip, spare, d, dt, luma_inv_q, luma_q)
                    for k in range(8):
                        row, dst = strip[k], luma[(top + 8 * half + k) % 32]
                        for j in range(wp):
                            dst[j] = row[j] + shift
                _block_codec(cb, cspare, d, dt, chroma_inv_q, chroma_q)
                _block_codec(cr, cspare, d, dt, chroma_inv_q, chroma_q)
                for k in range(8):
                    chroma[0, (8 * band + k) % 24] = cb[k]
                    chroma[1, (8 * band + k) % 24] = cr[k]
            if band > 0:
                for i in range(16 * (band - 1), min(16 * band, h)):
                    ci = i // 2
                    near = max(ci - 1, 0) if i % 2 == 0 else min(ci + 1, last)
                    _emit_row(
                        luma[i % 32],
                        chroma[0, ci % 24],
                        chroma[0, near % 24],
                        chroma[1, ci % 24],
                        chroma[1, near % 24],
                        blend,
                        wide,
                        out[img, 0, i],
                        out[img, 1, i],
                        out[img, 2, i],
                    )
