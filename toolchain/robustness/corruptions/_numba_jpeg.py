"""The numba-compiled JPEG round trip behind :func:`kernels.jpeg_rgb` (imported on first use).

The 2-D block DCT works on strips of 8 rows: a "vertical" step applies an 8x8 matrix to the
8 rows (one long vectorised loop per output row), a block transpose turns each 8x8 block of
the strip around, and the same vertical step then does the other axis. Coefficients come out
transposed per block (``(v, u)`` at ``[v, 8 b + u]``), which the tiled quantisation tables
follow; the inverse runs the same three steps with ``D.T``.
"""

from __future__ import annotations

import numpy as np

from toolchain.robustness.corruptions._numba import f32, jit


@jit
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


@jit
def _transpose_blocks(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - compiled
    """Every 8x8 block of the strip ``src`` transposed into ``dst``."""
    for b in range(0, src.shape[1], 8):
        for u in range(8):
            for k in range(8):
                dst[k, b + u] = src[u, b + k]


@jit
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


@jit
def _to_luma(
    red: np.ndarray, green: np.ndarray, blue: np.ndarray, top: int, to_ycc: np.ndarray, strip: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Level-shifted luma (``Y - 128``) of image rows ``top..top+7`` into ``strip``, rows past the
    image's last one and columns past its width replicating the last (libjpeg's MCU padding)."""
    h, w = red.shape
    y0, y1, y2, shift = to_ycc[0, 0], to_ycc[0, 1], to_ycc[0, 2], f32(128.0)
    for k in range(8):
        i, row = min(top + k, h - 1), strip[k]
        r, g, b = red[i], green[i], blue[i]
        for j in range(w):
            row[j] = y0 * r[j] + y1 * g[j] + y2 * b[j] - shift
        for j in range(w, strip.shape[1]):
            row[j] = row[w - 1]


@jit
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


@jit
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
    three, four = f32(3.0), f32(4.0)
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
    kr, kgb, kgr, kb = f32(1.402 / 16), f32(-0.344136 / 16), f32(-0.714136 / 16), f32(1.772 / 16)
    lo, hi, scale = f32(0.0), f32(255.0), f32(1 / 255)
    blue, red = wide[0], wide[1]
    for j in range(r.shape[0]):
        y, u, v = luma[j], blue[j], red[j]
        r[j] = min(max(np.rint(y + kr * v), lo), hi) * scale
        g[j] = min(max(np.rint(y + kgb * u + kgr * v), lo), hi) * scale
        b[j] = min(max(np.rint(y + kb * u), lo), hi) * scale


@jit
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
    shift = f32(128.0)
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
