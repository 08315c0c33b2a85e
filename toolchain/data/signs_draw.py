"""Vectorised drawing primitives for the procedural ``signs`` dataset.

Everything works on a batch at once: shapes are signed distance functions (negative inside)
evaluated on per-image sign coordinates ``(u, v)`` (the sign fills the unit disc), and
turned into anti-aliased coverage with ``clamp(0.5 - distance_in_pixels, 0, 1)``. Glyphs are
small bitmaps sampled bilinearly, which anti-aliases them for free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# 5x7 (and 3x5 for STOP) bitmap glyphs; '#' is ink. Kept as text so they can be read.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "3": (".###.", "#...#", "....#", "..##.", "....#", "#...#", ".###."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "!": ("..#..", ".###.", ".###.", "..#..", "..#..", ".....", "..#.."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "<": ("...#...", "..##...", ".######", "#######", ".######", "..##...", "...#..."),
    "s": ("###", "#..", "###", "..#", "###"),
    "t": ("###", ".#.", ".#.", ".#.", ".#."),
    "o": ("###", "#.#", "#.#", "#.#", "###"),
    "p": ("###", "#.#", "###", "#..", "#.."),
}


def glyph_bitmap(text: str) -> torch.Tensor:
    """The bitmap (H, W) float32 for ``text``; characters are joined with a one-column gap.

    ``">"`` is the mirror image of ``"<"`` (so the two arrows are exact mirror images).
    """
    parts = []
    for char in text:
        rows = _GLYPHS["<"] if char == ">" else _GLYPHS[char]
        bitmap = torch.tensor([[c == "#" for c in row] for row in rows], dtype=torch.float32)
        parts.append(bitmap.flip(1) if char == ">" else bitmap)
    height = max(p.shape[0] for p in parts)
    gap = torch.zeros(height, 1)
    columns: list[torch.Tensor] = []
    for i, part in enumerate(parts):
        columns.extend([gap] if i else [])
        columns.append(F.pad(part, (0, 0, 0, height - part.shape[0])))
    return torch.cat(columns, dim=1)


def coverage(distance: torch.Tensor, pixels_per_unit: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape given its signed distance in sign units."""
    return (0.5 - distance * pixels_per_unit).clamp_(0.0, 1.0)


def circle(u: torch.Tensor, v: torch.Tensor, radius: float) -> torch.Tensor:
    return torch.sqrt(u * u + v * v) - radius


def polygon(u: torch.Tensor, v: torch.Tensor, sides: int, apothem: float, rotation: float) -> torch.Tensor:
    """Regular polygon distance: max over edges of the distance to the edge's supporting line.

    Edge normals point at ``rotation + 2*pi*k/sides`` (image coordinates, v points down).
    Exact inside, slightly under-estimated near corners outside: fine for anti-aliasing.
    """
    angles = [rotation + 2 * math.pi * k / sides for k in range(sides)]
    distance = u * math.cos(angles[0]) + v * math.sin(angles[0])
    for angle in angles[1:]:
        distance = torch.maximum(distance, u * math.cos(angle) + v * math.sin(angle))
    return distance - apothem


def rect(u: torch.Tensor, v: torch.Tensor, half_w: float, half_h: float, angle: float = 0.0) -> torch.Tensor:
    """Rectangle centred on the origin, rotated by ``angle`` radians."""
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * u + s * v, -s * u + c * v
    return torch.maximum(u.abs() - half_w, v.abs() - half_h)


def glyph(
    u: torch.Tensor,
    v: torch.Tensor,
    bitmap: torch.Tensor,
    box: tuple[float, float, float, float],
    pixels_per_unit: torch.Tensor,
) -> torch.Tensor:
    """Coverage of ``bitmap`` stretched over ``box = (centre_u, centre_v, half_w, half_h)``.

    The bitmap is first enlarged (nearest) so one bitmap cell spans about one output pixel:
    bilinear sampling then gives a one-pixel soft edge at any image size instead of a blur
    over whole cells.
    """
    cu, cv, half_w, half_h = box
    cell_px = float(pixels_per_unit.mean()) * 2 * half_h / bitmap.shape[0]
    factor = max(1, min(8, round(cell_px)))
    big = bitmap.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    grid = torch.stack(((u - cu) / half_w, (v - cv) / half_h), dim=-1)
    source = big.expand(u.shape[0], 1, *big.shape)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def paint(image: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> None:
    """In place: ``image = image * (1 - alpha) + colour * alpha``.

    Args:
        image: (N, 3, H, W).
        alpha: (N, H, W) coverage.
        colour: (3,) or (N, 3) RGB in [0, 1].
    """
    a = alpha.unsqueeze(1)
    c = colour.view(-1, 3, 1, 1) if colour.dim() == 2 else colour.view(1, 3, 1, 1)
    image.mul_(1 - a).add_(a * c)


def _uniform(generator: torch.Generator, n: int, low: float, high: float, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=generator) * (high - low) + low


def background(generator: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Road scenes: gradient sky, horizon, grass, a road in perspective, clutter, blotches.

    Returns:
        (N, 3, size, size) float32 in [0, 1].
    """
    g = generator
    ys = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, size, 1)
    xs = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, 1, size)
    horizon = _uniform(g, n, 0.3, 0.7, 1, 1) * size

    # Sky: blue to overcast grey, lighter towards the horizon.
    blue = torch.tensor([0.35, 0.55, 0.85]) + _uniform(g, n, -0.12, 0.12, 3)
    overcast = _uniform(g, n, 0.0, 1.0, 1) ** 2
    sky_top = blue * (1 - overcast) + _uniform(g, n, 0.5, 0.85, 1) * overcast
    sky_low = (sky_top + 0.25).clamp(max=1.0)
    t = (ys / horizon).clamp(max=1.0).unsqueeze(1)
    image = (sky_top.view(n, 3, 1, 1) * (1 - t) + sky_low.view(n, 3, 1, 1) * t).expand(n, 3, size, size)
    image = image.contiguous()

    # Ground: grass, then an asphalt road converging on a vanishing point, with a centre line.
    below = (ys - horizon).clamp(min=0.0)
    ground = coverage(horizon - ys, torch.ones(1))
    grass = torch.tensor([0.28, 0.45, 0.2]) + _uniform(g, n, -0.1, 0.1, 3)
    paint(image, ground.expand(n, size, size), grass)
    vanish_x = _uniform(g, n, 0.2, 0.8, 1, 1) * size
    spread = _uniform(g, n, 0.6, 1.6, 1, 1)
    road = coverage((xs - vanish_x).abs() - spread * below, torch.ones(1)) * ground
    paint(image, road, _uniform(g, n, 0.25, 0.55, 1).expand(n, 3))
    dashes = (torch.sqrt(below) * 1.5).remainder(2.0) < 1.0
    line = coverage((xs - vanish_x).abs() - 0.04 * below - 0.2, torch.ones(1)) * ground * dashes
    paint(image, line, torch.tensor([0.9, 0.9, 0.85]))

    # Clutter around the horizon: buildings, trees, vehicles.
    for _ in range(3):
        centre_x = _uniform(g, n, -0.1, 1.1, 1, 1) * size
        half_w = _uniform(g, n, 0.05, 0.2, 1, 1) * size
        top = horizon - _uniform(g, n, 0.0, 0.4, 1, 1) * size
        bottom = horizon + _uniform(g, n, 0.0, 0.15, 1, 1) * size
        box = torch.maximum((xs - centre_x).abs() - half_w, torch.maximum(top - ys, ys - bottom))
        present = (torch.rand((n, 1, 1), generator=g) < 0.7).float()
        paint(image, coverage(box, torch.ones(1)) * present, torch.rand((n, 3), generator=g) * 0.7 + 0.1)

    # Low-frequency blotches (dirt, shadows, texture).
    blotches = F.interpolate(
        torch.randn((n, 3, 4, 4), generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    return image.add_(blotches * 0.05).clamp_(0.0, 1.0)


def distractor(image: torch.Tensor, generator: torch.Generator) -> None:
    """In place: a saturated blob (tail light, balloon, poster) so colour alone is not the class."""
    n, _, size, _ = image.shape
    g = generator
    ys = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, size, 1)
    xs = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, 1, size)
    palette = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.75], [0.95, 0.8, 0.1], [0.95, 0.95, 0.95]])
    colour = palette[torch.randint(0, 4, (n,), generator=g)]
    cx, cy = (_uniform(g, n, 0.0, 1.0, 1, 1) * size for _ in range(2))
    radius = _uniform(g, n, 0.04, 0.14, 1, 1) * size
    present = (torch.rand((n, 1, 1), generator=g) < 0.5).float()
    blob = torch.sqrt((xs - cx) ** 2 + ((ys - cy) * 1.4) ** 2) - radius
    paint(image, coverage(blob, torch.ones(1)) * present, colour)


def lighting(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, colour cast, a shadow ramp, sometimes blur, then sensor noise."""
    n, _, size, _ = image.shape
    g = generator
    contrast = _uniform(g, n, 0.65, 1.15, 1, 1, 1)
    brightness = torch.exp(_uniform(g, n, math.log(0.55), math.log(1.25), 1, 1, 1))
    cast = _uniform(g, n, 0.85, 1.15, 3, 1, 1)
    angle = _uniform(g, n, 0.0, 2 * math.pi, 1, 1, 1)
    ramp_strength = _uniform(g, n, 0.0, 0.25, 1, 1, 1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ramp = torch.cos(angle) * coords.view(1, 1, 1, size) + torch.sin(angle) * coords.view(1, 1, size, 1)
    image = ((image - 0.5) * contrast + 0.5) * brightness * cast * (1 + ramp_strength * ramp)

    # A 3x3 box blur on ~30% of images (defocus, motion), blended so strength varies.
    blur_mix = _uniform(g, n, 0.0, 1.0, 1, 1, 1) * (torch.rand((n, 1, 1, 1), generator=g) < 0.3)
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    image = image * (1 - blur_mix) + blurred * blur_mix

    noise_std = _uniform(g, n, 0.0, 0.05, 1, 1, 1)
    return image.add_(torch.randn(image.shape, generator=g) * noise_std).clamp_(0.0, 1.0)
