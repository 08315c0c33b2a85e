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
    return d.float()


def _quantise_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise, dequantise, inverse DCT every 8x8 block of ``(N, H, W)`` (H, W multiples of 8)."""
    n, h, w = plane.shape
    d = _dct_matrix().to(plane.device)
    blocks = (plane - 128).reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3)
    coef = d @ blocks @ d.T
    q = table.to(plane.device)
    coef = torch.round(coef / q) * q
    blocks = d.T @ coef @ d
    return blocks.transpose(2, 3).reshape(n, h, w) + 128


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    # libjpeg fills partial MCUs by replicating the last row/column.
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode/decode ``(N, C, H, W)`` in [0, 1] at ``quality``; RGB uses YCbCr 4:2:0, other C per plane."""
    n, c, h, w = x.shape
    pix = torch.round(x.clamp(0, 1) * 255)  # JPEG starts from 8-bit samples
    if c != 3:
        planes = _pad_to(pix, 8).flatten(0, 1)
        out = _quantise_plane(planes, quant_table(quality)).reshape(n, c, *planes.shape[-2:])
        return (torch.round(out).clamp(0, 255)[..., :h, :w]) / 255
    pix = _pad_to(pix, 16)  # 4:2:0 MCUs are 16x16
    r, g, b = pix[:, 0], pix[:, 1], pix[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 2x2 mean, libjpeg's h2v2 downsampling
    y = _quantise_plane(y, quant_table(quality))
    chroma = _quantise_plane(chroma.flatten(0, 1), quant_table(quality, chroma=True)).reshape(chroma.shape)
    # Bilinear x2 with half-pixel centres is libjpeg's 3/4-1/4 "fancy" upsampling.
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return torch.round(rgb).clamp(0, 255)[..., :h, :w] / 255
