"""The canvas ``driving-scenes`` paints on, its classes and colours, and the objects it places.

Each object painter takes the canvas, the row of the object's base, the road's centre and
half-width at that row, and the row's depth below the horizon (its scale), and draws its parts
back to front; the random draws it makes are part of the scene's stream, so their order is
part of what keeps a seed's scenes the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "lane_marking",
    "sidewalk",
    "sky",
    "vegetation",
    "building",
    "vehicle",
    "pedestrian",
    "traffic_sign",
)
ROAD, LANE, SIDEWALK, SKY, VEGETATION, BUILDING, VEHICLE, PEDESTRIAN, SIGN = range(len(CLASS_NAMES))
IGNORE = 255

#: Base colour of each class (objects vary around it).
COLORS: dict[int, tuple[float, float, float]] = {
    ROAD: (0.33, 0.33, 0.35),
    LANE: (0.93, 0.93, 0.88),
    SIDEWALK: (0.64, 0.6, 0.56),
    SKY: (0.5, 0.7, 0.95),
    VEGETATION: (0.22, 0.48, 0.2),
    BUILDING: (0.6, 0.47, 0.4),
    VEHICLE: (0.15, 0.25, 0.7),
    PEDESTRIAN: (0.75, 0.3, 0.3),
    SIGN: (0.85, 0.1, 0.1),
}


class Canvas:
    """An RGB image, its label map and its object map, painted back to front.

    ``drawing`` is the object being painted (-1 while painting the background): every pixel
    painted takes it in ``instances``, so a nearer object painted later takes over the pixels
    it hides.
    """

    def __init__(self, height: int, width: int, g: torch.Generator) -> None:
        self.h, self.w, self.g = height, width, g
        self.image = torch.zeros(3, height, width)
        self.label = torch.full((height, width), IGNORE, dtype=torch.uint8)
        self.instances = torch.full((height, width), -1, dtype=torch.int16)
        self.drawing = -1
        self.drawn: list[int] = []  # each object's pixels in the image once drawn
        self.yy = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width) + 0.5
        self.xx = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width) + 0.5

    def uniform(self, low: float, high: float) -> float:
        """One draw from the scene's stream, uniform in ``[low, high)``."""
        return float(torch.rand((), generator=self.g)) * (high - low) + low

    def color(self, cls: int, spread: float = 0.08) -> torch.Tensor:
        """The class's base colour, each channel moved by up to ``spread`` (three draws)."""
        base = torch.tensor(COLORS[cls])
        return (base + (torch.rand(3, generator=self.g) * 2 - 1) * spread).clamp(0, 1)

    def paint(self, mask: torch.Tensor, color: torch.Tensor, cls: int, owned: bool = True) -> None:
        """Paint ``mask``; ``owned=False`` for parts of no object's box (a pole)."""
        self.image[:, mask] = color.view(3, 1) if color.dim() == 1 else color[:, mask]
        self.label[mask] = cls
        self.instances.masked_fill_(mask, self.drawing if owned else -1)

    def box(self, top: float, bottom: float, left: float, right: float) -> torch.Tensor:
        """The pixels whose centres lie in the rectangle."""
        return (self.yy >= top) & (self.yy < bottom) & (self.xx >= left) & (self.xx < right)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
        """The pixels whose centres lie in the ellipse (radii at least half a pixel)."""
        return ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 <= 1


def _vehicle(c: Canvas, base: float, centre: float, half: float, depth: float) -> None:
    wide = 2 * half * c.uniform(0.3, 0.45)
    cx = centre + c.uniform(-1, 1) * max(half - wide / 2, 0)
    tall = wide * c.uniform(0.55, 0.8)
    body = c.box(base - tall * 0.6, base, cx - wide / 2, cx + wide / 2)
    cabin = c.box(base - tall, base - tall * 0.55, cx - wide * 0.35, cx + wide * 0.35)
    paint = (torch.rand(3, generator=c.g) * 0.9).clamp(0.05, 1)  # any car colour
    c.paint(body | cabin, paint, VEHICLE)
    glass = c.box(base - tall * 0.93, base - tall * 0.6, cx - wide * 0.3, cx + wide * 0.3)
    c.paint(glass, torch.tensor([0.12, 0.15, 0.2]), VEHICLE)
    for side in (-0.32, 0.32):
        wheel = c.ellipse(base - tall * 0.05, cx + side * wide, tall * 0.14, wide * 0.09)
        c.paint(wheel, torch.tensor([0.05, 0.05, 0.05]), VEHICLE)


def _pedestrian(c: Canvas, base: float, centre: float, half: float, depth: float) -> None:
    tall = depth * c.uniform(0.45, 0.6) + 2
    side = 1 if c.uniform(0, 1) < 0.5 else -1
    cx = centre + side * half * c.uniform(1.08, 1.3)
    body = c.box(base - tall * 0.8, base - tall * 0.4, cx - tall * 0.11, cx + tall * 0.11)
    legs = c.box(base - tall * 0.42, base, cx - tall * 0.08, cx + tall * 0.08)
    head = c.ellipse(base - tall * 0.89, cx, tall * 0.1, tall * 0.08)
    c.paint(body, c.color(PEDESTRIAN, 0.25), PEDESTRIAN)
    c.paint(legs, c.color(PEDESTRIAN, 0.1) * 0.4, PEDESTRIAN)
    c.paint(head, torch.tensor([0.85, 0.7, 0.58]) * c.uniform(0.5, 1.0), PEDESTRIAN)


def _sign(c: Canvas, base: float, centre: float, half: float, depth: float) -> None:
    tall = depth * c.uniform(0.8, 1.1) + 3
    side = 1 if c.uniform(0, 1) < 0.5 else -1
    cx = centre + side * half * c.uniform(1.35, 1.6)
    radius = tall * 0.16
    c.paint(
        c.box(base - tall, base, cx - tall * 0.02 - 0.3, cx + tall * 0.02 + 0.3),
        torch.tensor([0.5] * 3),
        IGNORE,
        owned=False,
    )
    cy = base - tall - radius * 0.6
    face = [torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.3, 0.8]), torch.tensor([0.95, 0.8, 0.1])]
    outer = c.ellipse(cy, cx, radius, radius)
    if c.uniform(0, 1) < 0.5:  # a square plate instead of a disc
        outer = c.box(cy - radius, cy + radius, cx - radius, cx + radius)
    c.paint(outer, face[int(c.uniform(0, 2.99))], SIGN)
    c.paint(c.ellipse(cy, cx, radius * 0.6, radius * 0.6), torch.tensor([0.95, 0.95, 0.95]), SIGN)


def _cyclist(c: Canvas, base: float, centre: float, half: float, depth: float) -> None:
    """A rider (labelled pedestrian) on a bicycle (labelled vehicle), on the road by its edge."""
    tall = depth * c.uniform(0.5, 0.62) + 3
    side = 1 if c.uniform(0, 1) < 0.5 else -1
    cx = centre + side * half * c.uniform(0.7, 0.92)
    wheel = tall * 0.16
    frame = c.box(base - tall * 0.32, base - tall * 0.25, cx - tall * 0.24, cx + tall * 0.24)
    wheels = c.ellipse(base - wheel, cx - tall * 0.24, wheel, wheel) | c.ellipse(
        base - wheel, cx + tall * 0.24, wheel, wheel
    )
    c.paint(wheels, torch.tensor([0.06, 0.06, 0.06]), VEHICLE)
    c.paint(frame, (torch.rand(3, generator=c.g) * 0.9).clamp(0.05, 1), VEHICLE)
    torso = c.box(base - tall * 0.84, base - tall * 0.45, cx - tall * 0.09, cx + tall * 0.07)
    leg = c.box(base - tall * 0.47, base - tall * 0.18, cx - tall * 0.04, cx + tall * 0.05)
    head = c.ellipse(base - tall * 0.91, cx - tall * 0.01, tall * 0.09, tall * 0.07)
    c.paint(torso, c.color(PEDESTRIAN, 0.25), PEDESTRIAN)
    c.paint(leg, c.color(PEDESTRIAN, 0.1) * 0.4, PEDESTRIAN)
    c.paint(head, torch.tensor([0.85, 0.7, 0.58]) * c.uniform(0.5, 1.0), PEDESTRIAN)


def _traffic_light(c: Canvas, base: float, centre: float, half: float, depth: float) -> None:
    """A dark housing with three lamps (one lit) on a pole beside the road; the pole is
    labelled 255 and belongs to no box, the housing to no segmentation class (255)."""
    tall = depth * c.uniform(1.0, 1.4) + 5
    side = 1 if c.uniform(0, 1) < 0.5 else -1
    cx = centre + side * half * c.uniform(1.2, 1.45)
    top = base - tall
    c.paint(
        c.box(top, base, cx - tall * 0.015 - 0.3, cx + tall * 0.015 + 0.3),
        torch.tensor([0.35] * 3),
        IGNORE,
        owned=False,
    )
    wide, high = tall * 0.11 + 1, tall * 0.3 + 2
    c.paint(c.box(top - high, top, cx - wide / 2, cx + wide / 2), torch.tensor([0.1, 0.1, 0.1]), IGNORE)
    lit = int(c.uniform(0, 2.99))
    lamps = ([1.0, 0.15, 0.1], [1.0, 0.75, 0.1], [0.2, 1.0, 0.35])
    for index, color in enumerate(lamps):
        glow = 1.0 if index == lit else 0.25
        lamp = c.ellipse(top - high * (5 - 2 * index) / 6, cx, high * 0.12, wide * 0.35)
        c.paint(lamp, torch.tensor(color) * glow, IGNORE)


#: The painter of each kind of object a scene places.
DRAWERS: dict[str, Callable[[Canvas, float, float, float, float], None]] = {
    "sign": _sign,
    "pedestrian": _pedestrian,
    "vehicle": _vehicle,
    "cyclist": _cyclist,
    "light": _traffic_light,
}
