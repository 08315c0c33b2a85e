"""``signs``: a procedural, seeded, traffic-sign-like RGB dataset (the zero-setup default).

Twelve classes drawn over road scenes with random scale, position, in-plane rotation,
horizontal squeeze (viewing angle), clutter, distractor blobs, occluders, lighting, blur and
sensor noise. Some classes differ only in a small glyph (speed limits 30/50/80), by a mirror
image (keep left/right) or by orientation (yield vs danger), so a small CNN learns them well
but not perfectly, especially on small, dark or blurred signs. Rotation stays within ±12° so
the mirror-image classes remain distinguishable.

The same seed gives bitwise the same images: every random number comes from one
``torch.Generator`` per split, and train and val use different streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from toolchain.data import signs_draw as draw
from toolchain.data.base import DATASETS, DataBundle, ImageTensorDataset, check_task, make_bundle, split_seed

DEFAULT_SIZE = 32
DEFAULT_TRAIN = 4000
DEFAULT_VAL = 1000
_BLOCK = 128  # images rendered at once, from one generator (bounds memory at large sizes)

RED = torch.tensor([0.8, 0.1, 0.1])
WHITE = torch.tensor([0.95, 0.95, 0.95])
BLACK = torch.tensor([0.05, 0.05, 0.05])
BLUE = torch.tensor([0.1, 0.3, 0.75])
YELLOW = torch.tensor([0.95, 0.8, 0.1])

# A layer maps sign coordinates (u, v) and pixels-per-unit to coverage (N, H, W).
Layer = tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]


def _shape(distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda u, v, ppu: draw.coverage(distance(u, v), ppu)


def _text(text: str, box: tuple[float, float, float, float]) -> Callable[..., torch.Tensor]:
    bitmap = draw.glyph_bitmap(text)
    return lambda u, v, ppu: draw.glyph(u, v, bitmap, box, ppu)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.minimum(draw.rect(u, v, 0.7, 0.11, math.pi / 4), draw.rect(u, v, 0.7, 0.11, -math.pi / 4))


def _speed(digits: str) -> list[Layer]:
    return [
        (_shape(lambda u, v: draw.circle(u, v, 1.0)), RED),
        (_shape(lambda u, v: draw.circle(u, v, 0.78)), WHITE),
        (_text(digits, (0.0, 0.0, 0.56, 0.48)), BLACK),
    ]


def _keep(direction: str) -> list[Layer]:
    return [
        (_shape(lambda u, v: draw.circle(u, v, 1.0)), BLUE),
        (_text(direction, (0.0, 0.0, 0.62, 0.55)), WHITE),
    ]


# Triangles: apothem 0.5 puts the vertices on the unit circle. Normals at pi/2 give a flat
# bottom edge (apex up, "danger"); at -pi/2 a flat top (apex down, "yield").
SIGNS: dict[str, list[Layer]] = {
    "stop": [
        (_shape(lambda u, v: draw.polygon(u, v, 8, 0.95, 0.0)), RED),
        (_shape(lambda u, v: draw.polygon(u, v, 8, 0.87, 0.0)), WHITE),
        (_shape(lambda u, v: draw.polygon(u, v, 8, 0.79, 0.0)), RED),
        (_text("stop", (0.0, 0.0, 0.62, 0.24)), WHITE),
    ],
    "yield": [
        (_shape(lambda u, v: draw.polygon(u, v, 3, 0.5, -math.pi / 2)), RED),
        (_shape(lambda u, v: draw.polygon(u, v, 3, 0.3, -math.pi / 2)), WHITE),
    ],
    "speed_30": _speed("30"),
    "speed_50": _speed("50"),
    "speed_80": _speed("80"),
    "no_entry": [
        (_shape(lambda u, v: draw.circle(u, v, 1.0)), RED),
        (_shape(lambda u, v: draw.rect(u, v, 0.68, 0.17)), WHITE),
    ],
    "priority_road": [
        (_shape(lambda u, v: draw.polygon(u, v, 4, 0.707, math.pi / 4)), WHITE),
        (_shape(lambda u, v: draw.polygon(u, v, 4, 0.48, math.pi / 4)), YELLOW),
    ],
    "keep_left": _keep("<"),
    "keep_right": _keep(">"),
    "danger": [
        (_shape(lambda u, v: draw.polygon(u, v, 3, 0.5, math.pi / 2)), RED),
        (_shape(lambda u, v: draw.polygon(u, v, 3, 0.3, math.pi / 2)), WHITE),
        (_text("!", (0.0, 0.02, 0.12, 0.3)), BLACK),
    ],
    "parking": [
        (_shape(lambda u, v: draw.polygon(u, v, 4, 0.8, 0.0)), BLUE),
        (_text("P", (0.0, 0.0, 0.42, 0.6)), WHITE),
    ],
    "no_stopping": [
        (_shape(lambda u, v: draw.circle(u, v, 1.0)), RED),
        (_shape(lambda u, v: draw.circle(u, v, 0.78)), BLUE),
        (_shape(_cross), RED),
    ],
}
CLASS_NAMES: tuple[str, ...] = tuple(SIGNS)


def _draw_signs(image: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> None:
    """In place: a pole, then the sign of each image's class, then sometimes an occluder."""
    n, _, size, _ = image.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand((n, 1, 1), generator=g) * (high - low) + low

    radius = uniform(0.24, 0.44) * size
    cx = uniform(0.0, 1.0) * (size - 1.6 * radius) + 0.8 * radius
    cy = uniform(0.0, 1.0) * (size - 1.6 * radius) + 0.8 * radius
    theta = uniform(-12.0, 12.0) * (math.pi / 180)
    squeeze = uniform(0.8, 1.1)
    ys = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, size, 1)
    xs = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, 1, size)

    pole = torch.rand((n, 1, 1), generator=g) < 0.6
    half_w = (radius * 0.07).clamp(min=0.6)
    pole_dist = torch.maximum((xs - cx).abs() - half_w, cy - ys)
    draw.paint(image, draw.coverage(pole_dist, torch.ones(1)) * pole, torch.tensor([0.45, 0.45, 0.45]))

    dx, dy = xs - cx, ys - cy
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = (cos * dx + sin * dy) / (radius * squeeze)
    v = (-sin * dx + cos * dy) / radius
    for label, layers in enumerate(SIGNS.values()):
        idx = (labels == label).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sub, ppu = image[idx], radius[idx]
        for coverage_fn, colour in layers:
            draw.paint(sub, coverage_fn(u[idx], v[idx], ppu), colour)
        image[idx] = sub

    # A thin occluder (branch, wire, another pole) across some signs.
    occluded = (torch.rand((n, 1, 1), generator=g) < 0.15).float()
    ox, angle = uniform(-0.5, 0.5), uniform(-1.0, 1.0)
    along = torch.cos(angle) * dx + torch.sin(angle) * dy
    across = -torch.sin(angle) * dx + torch.cos(angle) * dy - ox * radius
    bar = torch.maximum(across.abs() - radius * 0.12, along.abs() - radius * 1.5)
    draw.paint(image, draw.coverage(bar, torch.ones(1)) * occluded, torch.tensor([0.2, 0.25, 0.12]))


def _labels(n: int, seed: int) -> torch.Tensor:
    """Consecutive random permutations of the classes: balanced, and prefix-stable in ``n``."""
    g = torch.Generator().manual_seed(split_seed(seed, "labels"))
    blocks = [torch.randperm(len(SIGNS), generator=g) for _ in range(-(-n // len(SIGNS)))]
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.int64)


def generate(n: int, *, size: int = DEFAULT_SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` sign images; classes are balanced (counts differ by at most one).

    Images come in blocks of :data:`_BLOCK`, each from its own generator, so the output is
    prefix-stable: the first ``k`` images of ``generate(n)`` are ``generate(k)`` (a run
    validated on 200 images and an engine check on 100 see the same first 100).

    Args:
        n: number of images.
        size: square image side in pixels.
        seed: the random stream; the same seed gives bitwise the same output.

    Returns:
        ``(images, labels)``: uint8 (n, 3, size, size) and int64 (n,).
    """
    blocks = -(-n // _BLOCK)
    labels = _labels(blocks * _BLOCK, seed)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    with _one_thread():
        for b in range(blocks):
            _render_block(images, labels, b, size, seed)
    return images, labels[:n]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded for a while (the setting is process-wide; it is restored).

    Rendering is hundreds of small element-wise ops; on 2 cores splitting each over threads
    saves ~30% when the machine is idle but costs 10x when it is busy (threads wait for each
    other), so one thread gives the predictable time: ~1.4 s per 5000 32x32 images.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _render_block(images: torch.Tensor, labels: torch.Tensor, b: int, size: int, seed: int) -> None:
    """Render block ``b`` (from its own generator) into ``images`` in place."""
    n = images.shape[0]
    g = torch.Generator().manual_seed(split_seed(seed, f"block-{b}"))
    start, stop = b * _BLOCK, min(n, (b + 1) * _BLOCK)
    # The whole block is rendered even when only part is kept: that is what keeps the
    # random stream, and so every kept image, independent of n.
    image = draw.background(g, _BLOCK, size)
    draw.distractor(image, g)
    _draw_signs(image, labels[b * _BLOCK : (b + 1) * _BLOCK], g)
    image = draw.lighting(image, g)
    images[start:stop] = image[: stop - start].mul_(255.0).round_().to(torch.uint8)


@DATASETS.register("signs")
def load_signs(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Generate the ``signs`` dataset (``root`` is ignored: nothing is read from disk).

    Args:
        image_size: square side, default 32.
        train_samples: number of training images to generate, default 4000.
        val_samples: number of validation images, default 1000.
        seed: train and val use different streams derived from it.

    Returns:
        A 3-channel :class:`DataBundle`; mean/std are measured on the generated train split.
    """
    check_task("signs", task, ("classification",))
    size = image_size or DEFAULT_SIZE
    train = generate(train_samples or DEFAULT_TRAIN, size=size, seed=split_seed(seed, "signs-train"))
    val = generate(val_samples or DEFAULT_VAL, size=size, seed=split_seed(seed, "signs-val"))
    return make_bundle("signs", ImageTensorDataset(*train), ImageTensorDataset(*val), CLASS_NAMES)
