"""JPEG compression as torch ops: baseline JPEG's lossy steps, batched, on the input's device.

The lossy parts of baseline JPEG (what libjpeg/PIL do by default) are reproduced exactly in
kind: 8-bit samples, JFIF YCbCr, 4:2:0 chroma subsampling (2x2 mean), 8x8 DCT, quantisation
with the ITU-T T.81 Annex K tables scaled by the IJG quality formula, and "fancy" (triangle)
chroma upsampling on decode, rounded to 8 bits. Entropy coding is lossless and skipped.
libjpeg rounds its intermediate samples (YCbCr, downsampled and upsampled chroma) to integers
and uses an integer DCT; this float version does not, so pixels match a PIL round trip to
within about one 8-bit level on average rather than bit-exactly (tests check it).

Speed on CPU comes from doing whole planes at once with few passes: the 2-D block DCT is two
batched 8x8 left-multiplications (one through a transposed view, so blocks never have to be
gathered), the quantisation three in-place passes, and the scalings (255, the 1/4 of the 2x2
mean, the 1/16 of the upsampling) ride on weights that are applied anyway.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.robustness.corruptions import kernels

# ITU-T T.81 Annex K.1 example tables (natural row-major order), the libjpeg defaults.
_LUMA_Q = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_Q = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


def quant_table(quality: int, chroma: bool = False) -> torch.Tensor:
    """The 8x8 quantisation table libjpeg uses at ``quality`` (1..100), baseline-clamped to 1..255."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(_CHROMA_Q if chroma else _LUMA_Q, dtype=torch.float32)
    return ((base * scale + 50) // 100).clamp(1, 255)


@lru_cache(maxsize=1)
def _dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II; ``D @ B @ D.T`` gives exactly the JPEG coefficients of block B."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


@lru_cache(maxsize=32)
def _tables(
    quality: int, chroma: bool, rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``1 / Q`` and ``Q`` laid out like the transposed coefficients of a plane with ``rows`` rows.

    Coefficient ``(u, v)`` of the block at ``(bi, bj)`` sits at ``[8 bj + v, 8 bi + u]`` (see
    ``_block_codec``), so the table for one group of 8 transposed rows is ``Q.T`` tiled along
    the last axis: ``(8, rows)``, broadcast over the groups. Also returns the luma level
    shift in quantised DC units, ``1024 / Q[0, 0]`` (0 for chroma, see ``_block_codec``).
    """
    table = quant_table(quality, chroma)
    q = table.T.repeat(1, rows // 8)
    return (1 / q).to(device), q.to(device), 0.0 if chroma else 1024 / float(table[0, 0])


@lru_cache(maxsize=8)
def _dct_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``D``, ``D.T`` and ``D @ S / 4`` (``S`` sums pairs of 16 samples: 2:1 chroma subsampling)."""
    d = _dct_matrix()
    pairs = torch.kron(torch.eye(8, dtype=d.dtype), torch.ones(1, 2, dtype=d.dtype))
    return d.float().to(device), d.T.contiguous().float().to(device), (d @ pairs / 4).float().to(device)


def _buffer(storage: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``shape`` carved from the front of a spent tensor's memory, or a new tensor."""
    if storage is None:
        return like.new_empty(shape)
    return storage.view(-1)[: math.prod(shape)].view(shape)


def _columns(planes: torch.Tensor, mat: torch.Tensor, storage: torch.Tensor | None = None) -> torch.Tensor:
    """``mat`` (k, m) applied to every group of ``m`` rows of ``(B, H, W)``: ``(B, H k / m, W)``.

    The result goes into ``storage``'s memory when given (a spent buffer at least that big).
    """
    b, h, w = planes.shape
    k, m = mat.shape
    groups = planes.reshape(b * h // m, m, w)
    out = _buffer(storage, (b * h // m, k, w), planes)
    return torch.bmm(mat.expand(b * h // m, k, m), groups, out=out).view(b, h * k // m, w)


_LOOP_MIN_PIXELS = 64 * 64  # plane size from which _rows_transposed loops over planes


def _rows_transposed(
    planes: torch.Tensor, mat: torch.Tensor, storage: torch.Tensor | None = None
) -> torch.Tensor:
    """``mat`` (k, m) applied to every group of ``m`` columns of ``(B, H, W)``, result transposed.

    Returns ``(B, W k / m, H)``. Each image's transpose is a free view whose groups of ``m``
    columns are column-major ``(m, H)`` matrices with a fixed stride, which ``bmm`` reads
    directly: the transposition costs no pass of its own, and the next step (``_columns`` on
    the transposed plane) works along the other axis with the same fast left-multiplication.
    The result goes into ``storage``'s memory when given (a spent buffer at least that big).
    """
    b, h, w = planes.shape
    k, m = mat.shape
    if h * w < _LOOP_MIN_PIXELS:  # many small planes: one copy beats a Python loop of tiny products
        return _columns(planes.transpose(1, 2).contiguous(), mat, storage)
    out = _buffer(storage, (b, w // m, k, h), planes)
    lhs = mat.expand(w // m, k, m)
    for i in range(b):
        torch.bmm(lhs, planes[i].T.view(w // m, m, h), out=out[i])
    return out.view(b, w * k // m, h)


def _block_codec(
    planes: torch.Tensor,
    quality: int,
    chroma: bool,
    first_rows: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """DCT, quantise, dequantise and inverse-DCT every 8x8 block of ``(B, H, W)`` planes.

    The 2-D DCT ``D X D^T`` of a block is done separably on whole planes: ``D`` on groups of 8
    rows, then on groups of 8 columns through a transposed view (``_rows_transposed``), so no
    pass is spent gathering blocks; the coefficients stay transposed (``(B, W, H)``) for the
    quantisation and come back to raster order with the inverse's second step. ``first_rows``
    replaces the first row-wise matrix (``D @ S / 4`` for chroma: the horizontal half of the
    2x2 downsampling rides on the DCT). JPEG's level shift (samples - 128) moves only the luma
    DC coefficient, by ``-1024`` (the 2-D DCT's DC is sum / 8); chroma is computed without its
    +128 offset, which cancels the shift. ``scale`` multiplies the samples (on the first matrix).
    """
    d, dt, _ = _dct_matrices(planes.device)
    columns = _columns(planes, d * scale if scale != 1 else d)
    coef = _rows_transposed(columns, d if first_rows is None else first_rows)
    # Two buffers serve all four steps: each inverse step writes where a forward step's
    # spent result lies (a fresh buffer adds page faults to the pass that first fills it).
    b, w, h = coef.shape
    inv_q, q, dc_shift = _tables(quality, chroma, h, planes.device)
    groups = coef.view(b * w // 8, 8, h)
    groups.mul_(inv_q)
    dc = coef.view(b, w // 8, 8, h // 8, 8)[:, :, 0, :, 0]  # a 1/64 strided view
    if dc_shift:
        dc.sub_(dc_shift)
    groups.round_()
    if dc_shift:
        dc.add_(dc_shift)
    groups.mul_(q)
    return _rows_transposed(_columns(coef, dt, storage=columns), dt, storage=coef)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    # libjpeg fills partial MCUs by replicating the last row/column.
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _double(c: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` = ``c`` upsampled x2 along ``dim`` (-1 or -2) with weights 3 + 1 (4x the values).

    Sample ``2i`` is ``3 c[i] + c[i-1]``, ``2i+1`` is ``3 c[i] + c[i+1]``; at the edges the
    missing neighbour is the sample itself (``4 c``), so no padded copy is needed.
    """
    n = c.shape[dim]
    torch.mul(c.narrow(dim, 0, 1), 4, out=out.narrow(dim, 0, 1))
    torch.mul(c.narrow(dim, n - 1, 1), 4, out=out.narrow(dim, 2 * n - 1, 1))
    if n > 1:
        even = out.narrow(dim, 2, 2 * n - 2).unflatten(dim, (n - 1, 2)).select(dim, 0)
        odd = out.narrow(dim, 1, 2 * n - 2).unflatten(dim, (n - 1, 2)).select(dim, 0)
        torch.add(c.narrow(dim, 0, n - 1), c.narrow(dim, 1, n - 1), alpha=3, out=even)
        torch.add(c.narrow(dim, 1, n - 1), c.narrow(dim, 0, n - 1), alpha=3, out=odd)
    return out


def _fancy_upsample(c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """libjpeg's "fancy" x2 chroma upsampling, times 16: 3/4-1/4 triangle weights, edges replicated.

    The same numbers as bilinear interpolation with half-pixel centres, times 16 (the division
    is folded into the colour conversion's weights), written as strided writes of
    ``3 * near + far`` per axis (twice as fast on CPU as ``F.interpolate``). ``out``: where to
    write the ``(N, K, 2H, 2W)`` result (a new tensor if None).
    """
    n, k, h, w = c.shape
    rows = _double(c, -2, c.new_empty(n, k, 2 * h, w))
    return _double(rows, -1, c.new_empty(n, k, 2 * h, 2 * w) if out is None else out)


def _mix(pix: torch.Tensor, weights: tuple[float, ...], scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * sum_c weights[c] * pix[:, c]`` for an ``(N, 3, H, W)`` batch (3 fused passes)."""
    torch.mul(pix[:, 0], weights[0] * scale, out=out)
    out.add_(pix[:, 1], alpha=weights[1] * scale)
    return out.add_(pix[:, 2], alpha=weights[2] * scale)


@lru_cache(maxsize=16)
def _kernel_tables(quality: int, width: int) -> tuple[np.ndarray, ...]:
    """The compiled kernel's constants for ``width``-wide padded images (see ``_numba_jpeg.jpeg_rgb``).

    ``D``, ``D.T``; ``1 / Q`` and ``Q`` for luma and for chroma as ``Q.T`` tiled along a strip
    (luma strips are ``width`` wide, chroma strips half that); the YCbCr weights times 255,
    the chroma rows also times 1/4 (the 2x2 mean).
    """
    d = _dct_matrix().float().numpy()
    tables = [d, np.ascontiguousarray(d.T)]
    for chroma, strip in ((False, width), (True, width // 2)):
        q = quant_table(quality, chroma).T.repeat(1, strip // 8).numpy()
        tables += [np.ascontiguousarray(1 / q), np.ascontiguousarray(q)]
    to_ycc = torch.tensor(_TO_YCC, dtype=torch.float64) * torch.tensor([[255.0], [255 / 4], [255 / 4]])
    return (*tables, to_ycc.float().numpy())


def jpeg_round_trip(x: torch.Tensor, quality: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Encode/decode ``(N, C, H, W)`` in [0, 1] at ``quality``; RGB uses YCbCr 4:2:0, other C per plane.

    RGB float32 on CPU goes through the compiled kernel (``kernels.jpeg_rgb``: the same steps in
    one pass per MCU row, 1.8x faster than the torch ops at 512x256), which clamps to [0, 1].
    Elsewhere decoded samples may overshoot [0, 1] by the ringing a JPEG decoder clamps away: the
    caller (``Corruption.__call__``) clamps, which gives the same numbers as clamping to 0..255.
    ``out``: an ``(N, C, H, W)`` tensor to write the result into (a new one if None).
    """
    n, c, h, w = x.shape
    if c == 3 and kernels.usable(x):
        target = out if out is not None and out.is_contiguous() else torch.empty_like(x)
        kernels.jpeg_rgb(x.contiguous(), target, _kernel_tables(quality, -(-w // 16) * 16))
        return target if out is None or target is out else out.copy_(target)
    # The samples are 255 x, with the 255 folded into the first weights they meet. They are not
    # re-rounded to 8 bits: x is 8-bit data / 255 when it comes from images, so that would
    # change nothing but cost a pass (for other x it differs from an 8-bit JPEG by < 0.5 levels
    # before quantisation steps of 6 and more).
    x = _pad_to(x, 8 if c != 3 else 16)
    hp, wp = x.shape[-2:]
    if c != 3:
        planes = _block_codec(x.reshape(n * c, hp, wp), quality, chroma=False, scale=255.0)
        decoded = planes.round_().view(n, c, hp, wp)[..., :h, :w]
        return decoded.mul_(1 / 255) if out is None else torch.mul(decoded, 1 / 255, out=out)
    luma = _block_codec(_mix(x, _TO_YCC[0], 255.0, x.new_empty(n, hp, wp)), quality, chroma=False)
    # libjpeg's h2v2 downsampling is the mean of 2x2 samples: the row pairs are summed here, the
    # column pairs by the chroma DCT's first matrix, which also carries the 1/4. The +128 JFIF
    # offset cancels against the DCT's level shift, so it is left out on both sides.
    pairs = x[..., 0::2, :] + x[..., 1::2, :]
    chroma = x.new_empty(n, 2, hp // 2, wp)  # Cr, Cb: the order their upsampled planes are used in
    _mix(pairs, _TO_YCC[2], 255.0, chroma[:, 0])
    _mix(pairs, _TO_YCC[1], 255.0, chroma[:, 1])
    subsample = _dct_matrices(x.device)[2]
    chroma = _block_codec(chroma.view(2 * n, hp // 2, wp), quality, chroma=True, first_rows=subsample)
    # 16x the upsampled Cr and Cb go to the G and B planes of the output, which the colour
    # conversion then overwrites in place (R first, while Cr is still there).
    direct = out is not None and (hp, wp) == (h, w)  # padded MCUs need a bigger buffer
    # libjpeg upsamples the image's own chroma (ceil(H / 2) x ceil(W / 2)), replicating its last
    # row and column at the edges, not the padded MCUs' decoded samples.
    hc, wc = (h + 1) // 2, (w + 1) // 2
    rgb = out if out is not None and direct else x.new_empty(n, 3, 2 * hc, 2 * wc)
    _fancy_upsample(chroma.view(n, 2, hp // 2, wp // 2)[..., :hc, :wc], out=rgb[:, 1:])
    luma = luma[:, : 2 * hc, : 2 * wc]
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    torch.add(luma, g, alpha=1.402 / 16, out=r)
    torch.add(luma, g, alpha=-0.714136 / 16, out=g).add_(b, alpha=-0.344136 / 16)
    torch.add(luma, b, alpha=1.772 / 16, out=b)
    decoded = rgb.round_()[..., :h, :w]
    return decoded.mul_(1 / 255) if out is None or direct else torch.mul(decoded, 1 / 255, out=out)
