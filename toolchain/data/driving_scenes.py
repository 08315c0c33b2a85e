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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from toolchain.data.base import DATASETS, DataBundle, MaskTensorDataset, check_task, make_bundle, split_seed
from toolchain.data.boxes import DETECTION_CLASSES, BoxTensorDataset, Target, make_box_bundle, make_target
from toolchain.data.driving_paint import (
    BUILDING,
    CLASS_NAMES,
    COLORS,
    DRAWERS,
    IGNORE,
    LANE,
    PEDESTRIAN,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    VEGETATION,
    VEHICLE,
    Canvas,
)
from toolchain.errors import UserError

__all__ = [
    "BUILDING",
    "CLASS_NAMES",
    "COLORS",
    "DETECTION_CLASSES",
    "IGNORE",
    "LANE",
    "MIN_VISIBLE",
    "PEDESTRIAN",
    "ROAD",
    "SIDEWALK",
    "SIGN",
    "SKY",
    "VEGETATION",
    "VEHICLE",
    "DetectionScene",
    "Plant",
    "load_driving_scenes",
    "render_detection_scene",
    "render_detection_split",
    "render_scene",
    "render_split",
]

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


def render_scene(
    height: int, width: int, g: torch.Generator, plant: Plant | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segmentation scene: ``(uint8 3 x H x W image, uint8 H x W labels)``.

    Args:
        height, width: the image size.
        g: the random stream (advanced by the scene's draws).
        plant: an object painted last, before lighting (tests check its pixels' class).
    """
    c = Canvas(height, width, g)
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
    c = Canvas(height, width, g)
    kinds = _draw(c, plant, detection=True)
    image = _light(c)
    target = _visible_boxes(c.instances, kinds, c.drawn)
    return DetectionScene(image, c.label, c.instances, kinds, tuple(c.drawn), target)


def _draw(c: Canvas, plant: Plant | None, detection: bool) -> tuple[str, ...]:
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
        DRAWERS[kind](c, horizon + row, centre, half, row)
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


def _sky_and_ground(c: Canvas, horizon: float) -> None:
    top, low = c.color(SKY, 0.1), c.color(SKY, 0.1) * 0.6 + 0.4  # paler towards the horizon
    t = (c.yy / horizon).clamp(0, 1).unsqueeze(0)
    c.paint(c.yy < horizon, top.view(3, 1, 1) * (1 - t) + low.view(3, 1, 1) * t, SKY)
    c.paint(c.yy >= horizon, c.color(VEGETATION, 0.06), VEGETATION)  # grass verge


def _buildings_and_trees(c: Canvas, horizon: float, vx: float) -> None:
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


def _road(c: Canvas, horizon: float, vx: float, depth: torch.Tensor, ground: float) -> tuple[float, float]:
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


def _light(c: Canvas) -> torch.Tensor:
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
    with _one_thread():
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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Scenes are painted with many small tensor operations, where a second intra-op thread only
    costs synchronisation: about 10x slower on a busy 2-core machine than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
