"""Digital family: contrast, elastic transform, pixelate, JPEG and saturate (ImageNet-C tables)."""

from __future__ import annotations

from functools import lru_cache

import torch

from toolchain.robustness.corruptions import ops
from toolchain.robustness.corruptions.base import (
    Corruption,
    pick,
    register,
    spatial_scale,
    uniform,
)
from toolchain.robustness.corruptions.jpeg import jpeg_round_trip


@register
class Contrast(Corruption):
    """Lower contrast: pull every channel towards its per-image mean by factor ``c``."""

    name, family = "contrast", "digital"
    SMALL = (0.75, 0.5, 0.4, 0.3, 0.15)
    LARGE = (0.4, 0.3, 0.2, 0.1, 0.05)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        c = pick(x, severity, self.SMALL, self.LARGE)
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * c + mean


_ELASTIC_SMALL = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
_ELASTIC_LARGE = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))


@register
class ElasticTransform(Corruption):
    """Random affine (corner points moved by up to ``affine`` px) plus a smooth displacement field.

    Both warps are composed into one sampling grid and resampled once (the reference resamples
    twice, slightly softer). Sizes follow ``spatial_scale``; the displacement amplitude ``alpha``
    is scaled by its square because smoothing uniform noise over ``sigma`` px divides its amplitude
    by ``sigma``: that keeps the displacement a constant fraction of the image.
    """

    name, family = "elastic_transform", "digital"
    # (alpha, sigma, affine) in pixels; the reference writes them as fractions of 32 (CIFAR)
    # and of 244 (ImageNet, "244 should have been 224" per its own comment): kept as published.
    SMALL = tuple((32 * a, 32 * s, 32 * f) for a, s, f in _ELASTIC_SMALL)
    LARGE = tuple((244 * a, 244 * s, 244 * f) for a, s, f in _ELASTIC_LARGE)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        alpha, sigma, affine = pick(x, severity, self.SMALL, self.LARGE)
        n, _, h, w = x.shape
        s = spatial_scale(x)
        jitter = uniform((n, 3, 2), -1.0, 1.0, generator, x)
        noise = uniform((n, 2, h, w), -1.0, 1.0, generator, x)
        # Affine from three reference points (cv2.getAffineTransform), mapping source -> output.
        cx, cy, sq = w // 2, h // 2, min(h, w) // 3
        src = torch.tensor(
            [[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float32, device=x.device
        )
        dst = src + affine * s * jitter
        homog = torch.cat([src, torch.ones(3, 1, device=x.device)], 1).expand(n, 3, 3)
        m = torch.linalg.solve(homog, dst).transpose(1, 2)  # (n, 2, 3): dst = A @ src + t
        a_inv = torch.linalg.inv(m[:, :, :2])
        grid = ops.pixel_grid(n, h, w, x)
        if alpha > 0:
            # scipy 'reflect' border, truncate=3 as the reference; sigma may exceed the image.
            field = ops.gaussian_blur(noise, sigma * s, truncate=3.0, mode="symmetric") * (alpha * s * s)
            grid = grid + field.permute(0, 2, 3, 1)  # (dx, dy) per pixel
        rel = grid - m[:, None, None, :, 2]
        src_xy = torch.einsum("nij,nhwj->nhwi", a_inv, rel)
        return ops.warp(x, src_xy, padding_mode="reflection")


@lru_cache(maxsize=64)
def _box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` PIL ``BOX`` resampling: mean of source pixels whose centres fall in the
    output pixel's footprint (for upsampling that is nearest neighbour)."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    src = torch.arange(n_in, dtype=torch.float64) + 0.5
    d = src[None, :] - centre[:, None]
    mat = ((d >= -support) & (d < support)).double()
    return (mat / mat.sum(1, keepdim=True)).float()


@register
class Pixelate(Corruption):
    """Low resolution: BOX-downsample to ``c`` of the size, then BOX-upsample back (as PIL)."""

    name, family = "pixelate", "digital"
    SMALL = (0.95, 0.9, 0.85, 0.75, 0.65)
    LARGE = (0.6, 0.5, 0.4, 0.3, 0.25)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        c = pick(x, severity, self.SMALL, self.LARGE)
        h, w = x.shape[-2:]
        sh, sw = max(1, int(h * c)), max(1, int(w * c))
        ry = (_box_resize_matrix(sh, h) @ _box_resize_matrix(h, sh)).to(x.device)
        rx = (_box_resize_matrix(sw, w) @ _box_resize_matrix(w, sw)).to(x.device)
        return ry @ x @ rx.T


@register
class JpegCompression(Corruption):
    """JPEG at the table's quality (torch DCT quantisation with libjpeg's tables, see ``jpeg.py``)."""

    name, family = "jpeg_compression", "digital"
    SMALL = (80, 65, 58, 50, 40)
    LARGE = (25, 18, 15, 10, 7)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        return jpeg_round_trip(x, pick(x, severity, self.SMALL, self.LARGE))


@register
class Saturate(Corruption):
    """HSV saturation ``S * a + b`` with hue and value kept (severities 1-2 wash out, 3-5 boost).

    Computed without an HSV round trip: with H and V fixed each channel moves along
    ``V - (V - x) * S'/S``. Deviation from the reference: grey pixels (S = 0, hue undefined) stay
    grey, where skimage's hue 0 would tint them red at severities 4-5. Colour only: a batch
    with other than 3 channels is returned unchanged (a grey image has no saturation).
    """

    name, family = "saturate", "digital"
    needs_color = True
    SMALL = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))
    LARGE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        if x.shape[1] != 3:
            return x.clone()
        a, b = pick(x, severity, self.SMALL, self.LARGE)
        v = x.max(dim=1, keepdim=True).values
        sat = (v - x.min(dim=1, keepdim=True).values) / v.clamp_min(1e-6)
        new_sat = (sat * a + b).clamp(0, 1)
        ratio = torch.where(sat > 1e-6, new_sat / sat.clamp_min(1e-6), torch.zeros_like(sat))
        return v - (v - x) * ratio
