"""JPEG compression as torch ops: baseline JPEG's lossy steps, batched, on the input's device.

The lossy parts of baseline JPEG (what libjpeg/PIL do by default) are reproduced exactly in
kind: 8-bit input, JFIF YCbCr, 4:2:0 chroma subsampling (2x2 mean), 8x8 DCT, quantisation
with the ITU-T T.81 Annex K tables scaled by the IJG quality formula, and "fancy" (triangle)
chroma upsampling on decode. Entropy coding is lossless and skipped. libjpeg's integer DCT and
rounding differ slightly from this float DCT, so pixels match a PIL round trip to within a few
8-bit levels rather than bit-exactly (tests check the mean difference).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

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


@lru_cache(maxsize=64)
def _block_codec(
    quality: int, chroma: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(64, 64)`` matrices for flattened 8x8 blocks: DCT then divide by the table, and back.

    ``D B D^T`` on a row-major flattened block is ``kron(D, D)``; folding the quantisation
    table into it makes a whole plane's blocks one matrix product each way. JPEG's level shift
    (samples - 128) only moves the DC coefficient, by ``-1024`` (the 2-D DCT's DC is sum / 8):
    returned as the shift of the quantised DC, so no full-size pass is spent on it.
    """
    dd = torch.kron(_dct_matrix(), _dct_matrix())
    q = quant_table(quality, chroma).double().flatten()
    forward, inverse = (dd.T / q[None, :]).float().to(device), (q[:, None] * dd).float().to(device)
    return forward, inverse, float(1024 / q[0])


def _quantise_plane(plane: torch.Tensor, quality: int, chroma: bool) -> torch.Tensor:
    """DCT, quantise, dequantise, inverse DCT every 8x8 block of ``(N, H, W)`` (H, W multiples of 8)."""
    n, h, w = plane.shape
    forward, inverse, dc_shift = _block_codec(quality, chroma, plane.device)
    coef = plane.reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3).reshape(-1, 64) @ forward
    coef[:, 0] -= dc_shift  # the level shift, on the DC column only
    coef = torch.round_(coef)
    coef[:, 0] += dc_shift
    blocks = coef @ inverse
    return blocks.view(n, h // 8, w // 8, 8, 8).transpose(2, 3).reshape(n, h, w)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    # libjpeg fills partial MCUs by replicating the last row/column.
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _fancy_upsample(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's "fancy" x2 chroma upsampling: 3/4-1/4 triangle weights, edges replicated.

    The same numbers as bilinear interpolation with half-pixel centres, written as strided
    writes of ``3 * near + far`` per axis (twice as fast on CPU as ``F.interpolate``).
    """
    n, k, h, w = c.shape
    padded = torch.cat([c[..., :1, :], c, c[..., -1:, :]], -2)
    rows = torch.empty(n, k, 2 * h, w, dtype=c.dtype, device=c.device)
    torch.add(padded[..., :-2, :], c, alpha=3, out=rows[..., 0::2, :])
    torch.add(padded[..., 2:, :], c, alpha=3, out=rows[..., 1::2, :])
    padded = torch.cat([rows[..., :1], rows, rows[..., -1:]], -1)
    out = torch.empty(n, k, 2 * h, 2 * w, dtype=c.dtype, device=c.device)
    torch.add(padded[..., :-2], rows, alpha=3, out=out[..., 0::2])
    torch.add(padded[..., 2:], rows, alpha=3, out=out[..., 1::2])
    return out.mul_(1 / 16)


def _mix(pix: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """``sum_c weights[c] * pix[:, c]`` for an ``(N, 3, H, W)`` batch -> ``(N, H, W)``."""
    out = pix[:, 0] * weights[0]
    out.add_(pix[:, 1], alpha=weights[1])
    return out.add_(pix[:, 2], alpha=weights[2])


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode/decode ``(N, C, H, W)`` in [0, 1] at ``quality``; RGB uses YCbCr 4:2:0, other C per plane."""
    n, c, h, w = x.shape
    pix = x.clamp(0, 1).mul(255).round_()  # JPEG starts from 8-bit samples
    if c != 3:
        planes = _pad_to(pix, 8).flatten(0, 1)
        out = _quantise_plane(planes, quality, chroma=False).reshape(n, c, *planes.shape[-2:])
        return out.round_().clamp_(0, 255)[..., :h, :w].div(255)
    pix = _pad_to(pix, 16)  # 4:2:0 MCUs are 16x16
    # Every colour combination is a few fused passes over planes (a conv would be far slower on CPU).
    y = _mix(pix, _TO_YCC[0])
    # 2x2 sums (libjpeg's h2v2 downsampling is their mean), then Cb/Cr on the quarter-size planes;
    # the +128 offset cancels against the DCT's level shift, so it is left out on both sides.
    rows = pix[..., 0::2, :] + pix[..., 1::2, :]
    quad = (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)
    chroma = torch.stack([_mix(quad, _TO_YCC[1]), _mix(quad, _TO_YCC[2])], 1).add_(128)  # JFIF offset
    y = _quantise_plane(y, quality, chroma=False)
    chroma = _quantise_plane(chroma.flatten(0, 1), quality, chroma=True).view(chroma.shape) - 128
    chroma = _fancy_upsample(chroma)
    cb, cr = chroma[:, 0], chroma[:, 1]
    rgb = torch.empty_like(pix)
    torch.add(y, cr, alpha=1.402, out=rgb[:, 0])
    torch.add(y, cb, alpha=-0.344136, out=rgb[:, 1]).add_(cr, alpha=-0.714136)
    torch.add(y, cb, alpha=1.772, out=rgb[:, 2])
    return rgb.round_().clamp_(0, 255)[..., :h, :w].div_(255)
