"""``driving-scenes``: procedural, seeded street scenes with a class for every pixel.

Nine classes (Cityscapes-like): road, lane marking, sidewalk, sky, vegetation, building,
vehicle, pedestrian, traffic sign. Each scene has a random horizon and vanishing point; the
road, its sidewalks and the dashed lane markings follow that perspective (widths and dash
lengths grow towards the camera), buildings and trees stand on the horizon, and vehicles,
pedestrians and signs are scaled by their distance and drawn far to near so near objects
occlude far ones. Sign poles are labelled 255 (ignore: "pole" is not a class here). Lighting
(brightness, colour cast), per-object colours, window grids and sensor noise vary per scene.

Images are ``width x width/2`` (``data.image_size`` is the width; default 256, so 256x128).
The same seed gives bitwise the same images: every random number of a split comes from one
``torch.Generator`` seeded from the user's seed, and train and val use different streams.

For ``task: detection`` (:func:`render_detection_scene`) the scenes also hold cyclists (a rider
on a bicycle, on the road near its edge) and traffic lights (a housing with three lamps, one
lit, on a pole), and each object's box is the bounding box of its pixels still visible in the
finished image: an object cut by the image border gets the part inside, an object partly
hidden by a nearer one keeps the part still seen, and one hidden entirely has no box. Classes
(:data:`DETECTION_CLASSES`): car, pedestrian, cyclist, traffic_sign, traffic_light; poles
belong to no box. Boxes under 8 px high, and objects left with under a quarter of the pixels
they had when drawn, are flagged ``ignore``. Default size 512x256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.data.base import DATASETS, DataBundle, MaskTensorDataset, check_task, make_bundle, split_seed
from toolchain.data.boxes import DETECTION_CLASSES, BoxTensorDataset, Target, make_box_bundle, make_target
from toolchain.errors import UserError

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
DEFAULT_WIDTH = 256
DEFAULT_DETECTION_WIDTH = 512
MIN_WIDTH = 32
DEFAULT_TRAIN = 2000
DEFAULT_VAL = 200

#: An object hidden (by nearer ones) down to less than this share of its pixels is ``ignore``:
#: a sliver of a car is not a car a detector can be asked to find.
MIN_VISIBLE = 0.25
#: The index in DETECTION_CLASSES of each kind of drawn object.
_KIND_CLASS = {"vehicle": 0, "pedestrian": 1, "cyclist": 2, "sign": 3, "light": 4}
#: A planted rectangle of these segmentation classes is an object with a box (the rest occlude).
_PLANT_KIND = {VEHICLE: "vehicle", PEDESTRIAN: "pedestrian", SIGN: "sign"}

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


@dataclass(frozen=True)
class Plant:
    """An object painted last over a scene, for tests: class ``cls`` on rows ``top:bottom``
    and columns ``left:right``, in the class's base colour. In a detection scene a vehicle,
    pedestrian or sign plant is an object with a box (car, pedestrian, traffic_sign); any
    other class only occludes what is behind it."""

    cls: int
    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class DetectionScene:
    """A detection scene: the image, its per-pixel classes, which object owns each pixel
    (index into ``kinds``, -1 for none), the kind of each object drawn and how many pixels it
    had in the image when drawn (before nearer objects hid some), and its target."""

    image: torch.Tensor
    label: torch.Tensor
    instances: torch.Tensor
    kinds: tuple[str, ...]
    drawn: tuple[int, ...]
    target: Target


class _Canvas:
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
        return float(torch.rand((), generator=self.g)) * (high - low) + low

    def color(self, cls: int, spread: float = 0.08) -> torch.Tensor:
        base = torch.tensor(COLORS[cls])
        return (base + (torch.rand(3, generator=self.g) * 2 - 1) * spread).clamp(0, 1)

    def paint(self, mask: torch.Tensor, color: torch.Tensor, cls: int, owned: bool = True) -> None:
        """Paint ``mask``; ``owned=False`` for parts of no object's box (a pole)."""
        self.image[:, mask] = color.view(3, 1) if color.dim() == 1 else color[:, mask]
        self.label[mask] = cls
        self.instances.masked_fill_(mask, self.drawing if owned else -1)

    def box(self, top: float, bottom: float, left: float, right: float) -> torch.Tensor:
        return (self.yy >= top) & (self.yy < bottom) & (self.xx >= left) & (self.xx < right)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
        return ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 <= 1


def render_scene(
    height: int, width: int, g: torch.Generator, plant: Plant | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segmentation scene: ``(uint8 3 x H x W image, uint8 H x W labels)``.

    Args:
        height, width: the image size.
        g: the random stream (advanced by the scene's draws).
        plant: an object painted last, before lighting (tests check its pixels' class).
    """
    c = _Canvas(height, width, g)
    _draw(c, plant, detection=False)
    return _light(c), c.label


def render_detection_scene(
    height: int, width: int, g: torch.Generator, plant: Plant | None = None
) -> DetectionScene:
    """One detection scene (see the module docstring): cyclists and traffic lights besides the
    segmentation scene's objects, each object's box from its visible pixels.

    Args:
        height, width: the image size.
        g: the random stream (advanced by the scene's draws).
        plant: an object painted last, before lighting (tests check its box).
    """
    c = _Canvas(height, width, g)
    kinds = _draw(c, plant, detection=True)
    image = _light(c)
    target = _visible_boxes(c.instances, kinds, c.drawn)
    return DetectionScene(image, c.label, c.instances, kinds, tuple(c.drawn), target)


def _draw(c: _Canvas, plant: Plant | None, detection: bool) -> tuple[str, ...]:
    """Paint a scene back to front; returns the kind of each object, by its index in
    ``c.instances``. The segmentation scene (``detection=False``) draws nothing more than it
    always has, so its images stay the same for the same seed."""
    horizon = c.h * c.uniform(0.36, 0.5)
    vx = c.w * c.uniform(0.35, 0.65)
    depth = c.yy - horizon  # rows below the horizon: nearer as it grows
    ground = c.h - horizon
    _sky_and_ground(c, horizon)
    _buildings_and_trees(c, horizon, vx)
    left, right = _road(c, horizon, vx, depth, ground)
    objects = (
        [("sign", c.uniform(0.15, 0.9)) for _ in range(int(c.uniform(0, 2.99)))]
        + [("pedestrian", c.uniform(0.2, 1.0)) for _ in range(int(c.uniform(0, 3.99)))]
        + [("vehicle", c.uniform(0.12, 0.95)) for _ in range(int(c.uniform(0, 3.99)))]
    )
    if detection:
        objects += [("cyclist", c.uniform(0.2, 0.9)) for _ in range(int(c.uniform(0, 1.99)))]
        objects += [("light", c.uniform(0.1, 0.6)) for _ in range(int(c.uniform(0, 1.99)))]
    objects.sort(key=lambda item: item[1])  # far to near: near objects occlude far ones
    kinds: list[str] = []
    for kind, near in objects:
        row = near * ground  # rows below the horizon
        centre, half = vx + row * (right - left) / 2, row * (left + right) / 2  # of the road there
        c.drawing = len(kinds)
        _DRAWERS[kind](c, horizon + row, centre, half, row)
        kinds.append(kind)
        if detection:  # its pixels before anything nearer hides some
            c.drawn.append(int((c.instances == c.drawing).sum()))
    c.drawing = -1
    if plant is not None:
        if detection and plant.cls in _PLANT_KIND:
            c.drawing = len(kinds)
            kinds.append(_PLANT_KIND[plant.cls])
        c.paint(
            c.box(plant.top, plant.bottom, plant.left, plant.right),
            torch.tensor(COLORS[plant.cls]),
            plant.cls,
        )
        if c.drawing >= 0:
            c.drawn.append(int((c.instances == c.drawing).sum()))
        c.drawing = -1
    return tuple(kinds)


def _visible_boxes(instances: torch.Tensor, kinds: tuple[str, ...], drawn: list[int]) -> Target:
    """Each object's box: the bounding box of its pixels in ``instances`` (xyxy, pixel
    edges); an object with no pixel left (hidden or outside the image) has none, and one with
    less than :data:`MIN_VISIBLE` of the pixels it had when drawn is flagged ``ignore``."""
    boxes, labels, hidden = [], [], []
    for index, kind in enumerate(kinds):
        ys, xs = torch.nonzero(instances == index, as_tuple=True)
        if len(ys):
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
            labels.append(_KIND_CLASS[kind])
            hidden.append(len(ys) < MIN_VISIBLE * drawn[index])
    return make_target(boxes, labels, hidden)


def _sky_and_ground(c: _Canvas, horizon: float) -> None:
    top, low = c.color(SKY, 0.1), c.color(SKY, 0.1) * 0.6 + 0.4  # paler towards the horizon
    t = (c.yy / horizon).clamp(0, 1).unsqueeze(0)
    c.paint(c.yy < horizon, top.view(3, 1, 1) * (1 - t) + low.view(3, 1, 1) * t, SKY)
    c.paint(c.yy >= horizon, c.color(VEGETATION, 0.06), VEGETATION)  # grass verge


def _buildings_and_trees(c: _Canvas, horizon: float, vx: float) -> None:
    for _ in range(int(c.uniform(3, 8))):
        wide = c.w * c.uniform(0.08, 0.25)
        left = c.uniform(-0.1, 1.0) * c.w
        if left < vx < left + wide:  # keep the street's far end open
            left = vx + c.w * 0.05 if left + wide / 2 > vx else vx - c.w * 0.05 - wide
        top = horizon - c.h * c.uniform(0.1, 0.38)
        mask = c.box(top, horizon + 1, left, left + wide)
        c.paint(mask, c.color(BUILDING, 0.15), BUILDING)
        cell = max(2.0, c.h * c.uniform(0.03, 0.06))
        windows = mask & ((c.yy - top) % cell < cell * 0.55) & ((c.xx - left) % cell < cell * 0.5)
        c.paint(windows, c.color(BUILDING, 0.05) * 0.45, BUILDING)  # windows are part of the building
    for _ in range(int(c.uniform(1, 6))):
        r = c.h * c.uniform(0.04, 0.12)
        cx = c.uniform(0, 1) * c.w
        c.paint(
            c.ellipse(horizon - r * c.uniform(0.3, 1.0), cx, r, r * c.uniform(0.8, 1.4)),
            c.color(VEGETATION),
            VEGETATION,
        )


def _road(c: _Canvas, horizon: float, vx: float, depth: torch.Tensor, ground: float) -> tuple[float, float]:
    """Road, sidewalks and dashed lane markings; returns the road's edge slopes (px per row)."""
    half_left, half_right = c.w * c.uniform(0.25, 0.5), c.w * c.uniform(0.25, 0.5)
    left, right = half_left / ground, half_right / ground  # x offset per row below the horizon
    curb = c.uniform(0.25, 0.5)
    below = depth > 0
    x_left, x_right = vx - depth * left, vx + depth * right
    walk = below & (c.xx >= x_left - depth * left * curb) & (c.xx <= x_right + depth * right * curb)
    c.paint(walk, c.color(SIDEWALK), SIDEWALK)
    c.paint(below & (c.xx >= x_left) & (c.xx <= x_right), c.color(ROAD, 0.05), ROAD)
    period = ground * c.uniform(1.5, 3.0)  # dashes shorten with distance: a period in 1/depth
    dashes = (period / depth.clamp_min(1e-3)) % 1.0 < 0.5
    for share in [c.uniform(0.4, 0.6)] if c.uniform(0, 1) < 0.6 else [0.33, 0.67]:
        centre = x_left + (x_right - x_left) * share
        half_width = depth * (left + right) * 0.012 + 0.3
        line = below & (depth > 2) & ((c.xx - centre).abs() <= half_width) & dashes
        c.paint(line, c.color(LANE, 0.04), LANE)
    return left, right


def _vehicle(c: _Canvas, base: float, centre: float, half: float, depth: float) -> None:
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


def _pedestrian(c: _Canvas, base: float, centre: float, half: float, depth: float) -> None:
    tall = depth * c.uniform(0.45, 0.6) + 2
    side = 1 if c.uniform(0, 1) < 0.5 else -1
    cx = centre + side * half * c.uniform(1.08, 1.3)
    body = c.box(base - tall * 0.8, base - tall * 0.4, cx - tall * 0.11, cx + tall * 0.11)
    legs = c.box(base - tall * 0.42, base, cx - tall * 0.08, cx + tall * 0.08)
    head = c.ellipse(base - tall * 0.89, cx, tall * 0.1, tall * 0.08)
    c.paint(body, c.color(PEDESTRIAN, 0.25), PEDESTRIAN)
    c.paint(legs, c.color(PEDESTRIAN, 0.1) * 0.4, PEDESTRIAN)
    c.paint(head, torch.tensor([0.85, 0.7, 0.58]) * c.uniform(0.5, 1.0), PEDESTRIAN)


def _sign(c: _Canvas, base: float, centre: float, half: float, depth: float) -> None:
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


def _cyclist(c: _Canvas, base: float, centre: float, half: float, depth: float) -> None:
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


def _traffic_light(c: _Canvas, base: float, centre: float, half: float, depth: float) -> None:
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


_DRAWERS = {
    "sign": _sign,
    "pedestrian": _pedestrian,
    "vehicle": _vehicle,
    "cyclist": _cyclist,
    "light": _traffic_light,
}


def _light(c: _Canvas) -> torch.Tensor:
    """Brightness, colour cast, a vertical light gradient and sensor noise; to uint8."""
    brightness = c.uniform(0.45, 1.2)
    cast = 1 + (torch.rand(3, 1, 1, generator=c.g) * 2 - 1) * 0.08
    gradient = 1 + c.uniform(-0.2, 0.2) * (c.yy / c.h - 0.5)
    noise = torch.randn(c.image.shape, generator=c.g) * c.uniform(0.01, 0.04)
    image = c.image * brightness * cast * gradient + noise
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def render_split(count: int, width: int, seed: int, split: str) -> MaskTensorDataset:
    """``count`` scenes from the split's own random stream."""
    height = width // 2
    g = torch.Generator().manual_seed(split_seed(seed, f"driving-scenes-{split}"))
    images = torch.empty(count, 3, height, width, dtype=torch.uint8)
    labels = torch.empty(count, height, width, dtype=torch.uint8)
    for i in range(count):
        images[i], labels[i] = render_scene(height, width, g)
    return MaskTensorDataset(images, labels)


def render_detection_split(count: int, width: int, seed: int, split: str) -> BoxTensorDataset:
    """``count`` detection scenes (and their boxes) from the split's own random stream."""
    height = width // 2
    g = torch.Generator().manual_seed(split_seed(seed, f"driving-scenes-detection-{split}"))
    images = torch.empty(count, 3, height, width, dtype=torch.uint8)
    targets = []
    for i in range(count):
        scene = render_detection_scene(height, width, g)
        images[i] = scene.image
        targets.append(scene.target)
    return BoxTensorDataset(images, targets)


@DATASETS.register("driving-scenes")
def load_driving_scenes(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Generate the ``driving-scenes`` dataset (no files; ``root`` is ignored).

    Args:
        image_size: the width; the height is half of it (default 256 x 128 for segmentation,
            512 x 256 for detection).
        train_samples, val_samples: scenes to generate (defaults 2000 and 200).
        seed: the same seed gives the same scenes.
        task: ``segmentation`` (the default: a class per pixel) or ``detection`` (boxes of
            :data:`DETECTION_CLASSES`, batched by ``bundle.collate``).

    Raises:
        UserError: a width below 32 or not even, or a task without labels here.
    """
    task = check_task("driving-scenes", task, ("segmentation", "detection"))
    width = image_size or (DEFAULT_DETECTION_WIDTH if task == "detection" else DEFAULT_WIDTH)
    if width < MIN_WIDTH or width % 2:
        raise UserError(
            f"driving-scenes: data.image_size (the width) must be even and >= {MIN_WIDTH}, got {width}"
        )
    train_count, val_count = train_samples or DEFAULT_TRAIN, val_samples or DEFAULT_VAL
    if task == "detection":
        return make_box_bundle(
            "driving-scenes",
            render_detection_split(train_count, width, seed, "train"),
            render_detection_split(val_count, width, seed, "val"),
            DETECTION_CLASSES,
        )
    train = render_split(train_count, width, seed, "train")
    val = render_split(val_count, width, seed, "val")
    return make_bundle("driving-scenes", train, val, CLASS_NAMES, task="segmentation")
