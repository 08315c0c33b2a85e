"""Digital family: contrast, elastic transform, pixelate, JPEG and saturate (ImageNet-C tables)."""

from __future__ import annotations

import torch

from toolchain.robustness.corruptions import filters, ops
from toolchain.robustness.corruptions.base import (
    Corruption,
    is_small,
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
        return torch.add(mean * (1 - c), x, alpha=c)  # (x - mean) c + mean in one pass


_ELASTIC_SMALL = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


@register
class ElasticTransform(Corruption):
    """Smooth random displacement field (plus, on small images, a random affine), one resampling.

    Images up to 64 px use the CIFAR-10-C table (``make_cifar_c.py``): corner points moved by
    up to ``affine`` px plus Gaussian-smoothed uniform noise; sizes follow ``spatial_scale`` and
    the displacement amplitude ``alpha`` is scaled by its square (smoothing uniform noise over
    ``sigma`` px divides its amplitude by ``sigma``). Both warps are composed and resampled once.

    Larger images follow the reference (``imagecorruptions``), which re-parameterised ImageNet-C's
    elastic transform relative to the image: uniform noise of amplitude ``0.5 %`` of the height,
    smoothed with ``sigma = 1 %`` of each side (scipy 'reflect' border, truncate 3), times
    ``alpha``; no affine part. ``make_imagenet_c.py``'s own table (affine moves of 24-49 px at
    severities 1-2) was measured 3.9x stronger than the reference at 224 px.
    """

    name, family = "elastic_transform", "digital"
    moves_pixels = True
    # (alpha, sigma, affine) in pixels; the reference writes them as fractions of 32 (CIFAR).
    SMALL = tuple((32 * a, 32 * s, 32 * f) for a, s, f in _ELASTIC_SMALL)
    LARGE_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
    NOISE, SIGMA = 0.005, 0.01  # noise amplitude / height, smoothing sigma / side

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        if not is_small(x):
            return self._relative(x, self.LARGE_ALPHA[severity - 1], generator)
        alpha, sigma, affine = self.SMALL[severity - 1]
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
            field = filters.gaussian_blur(noise, sigma * s, truncate=3.0, mode="symmetric") * (alpha * s * s)
            grid = grid + field.permute(0, 2, 3, 1)  # (dx, dy) per pixel
        rel = grid - m[:, None, None, :, 2]
        src_xy = torch.einsum("nij,nhwj->nhwi", a_inv, rel)
        return ops.warp(x, src_xy, padding_mode="reflection")

    def _relative(self, x: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        amp = self.NOISE * h
        noise = uniform((n, 2, h, w), -amp, amp, generator, x)  # (dx, dy)
        field = filters.gaussian_blur(noise, (self.SIGMA * h, self.SIGMA * w), truncate=3.0, mode="symmetric")
        return ops.warp_by(x, field.mul_(alpha), padding_mode="reflection")


@register
class Pixelate(Corruption):
    """Low resolution: BOX-downsample to ``c`` of the size, then NEAREST-upsample back (as PIL)."""

    name, family = "pixelate", "digital"
    SMALL = (0.95, 0.9, 0.85, 0.75, 0.65)
    LARGE = (0.6, 0.5, 0.4, 0.3, 0.25)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        return filters.pixelate(x, pick(x, severity, self.SMALL, self.LARGE))

    def _apply_into(
        self, x: torch.Tensor, severity: int, generator: torch.Generator, out: torch.Tensor | None
    ) -> torch.Tensor:
        return filters.pixelate(x, pick(x, severity, self.SMALL, self.LARGE), out=out)  # already in [0, 1]


@register
class JpegCompression(Corruption):
    """JPEG at the table's quality: libjpeg's lossy steps and tables (``jpeg.py``; compiled on CPU)."""

    name, family = "jpeg_compression", "digital"
    SMALL = (80, 65, 58, 50, 40)
    LARGE = (25, 18, 15, 10, 7)

    def _apply(self, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
        return jpeg_round_trip(x, pick(x, severity, self.SMALL, self.LARGE))

    def _apply_into(
        self, x: torch.Tensor, severity: int, generator: torch.Generator, out: torch.Tensor | None
    ) -> torch.Tensor:
        return jpeg_round_trip(x, pick(x, severity, self.SMALL, self.LARGE), out=out).clamp_(0.0, 1.0)


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
        v = x.amax(dim=1, keepdim=True)
        sat = (v - x.amin(dim=1, keepdim=True)) / v.clamp_min(1e-6)
        new_sat = (sat * a + b).clamp(0, 1)
        ratio = torch.where(sat > 1e-6, new_sat / sat.clamp_min(1e-6), torch.zeros_like(sat))
        return torch.addcmul(v * (1 - ratio), x, ratio)  # v - (v - x) * ratio in one full-size pass
