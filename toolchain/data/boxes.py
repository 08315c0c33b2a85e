"""Detection datasets: images with boxes, the batch collate, and the rules every loader shares.

A target is one dict per image: ``boxes`` float32 ``(n, 4)`` xyxy in pixels of the loaded
image (``x1 > x0``, edges at pixel borders, so a box over pixel columns ``3..5`` is
``x0=3, x1=6``), ``labels`` int64 ``(n,)`` indices into the bundle's ``class_names``, and
``ignore`` bool ``(n,)``: objects a detector is neither rewarded nor punished for finding
(crowds, don't-care regions, objects too small to see at the loaded size). The detection
task's loss and scores read it (:mod:`toolchain.tasks.detection`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from toolchain.data.base import DataBundle, make_bundle
from toolchain.errors import AnnotationError, UserError

__all__ = [
    "DETECTION_CLASSES",
    "EDGE_TOLERANCE",
    "MIN_BOX_HEIGHT",
    "BoxTensorDataset",
    "Target",
    "checked_box",
    "collate_boxes",
    "header_size",
    "make_box_bundle",
    "make_target",
    "read_resized",
    "scale_target",
]

#: The driving classes of ``driving-scenes`` and ``kitti`` boxes, in label order.
DETECTION_CLASSES: tuple[str, ...] = ("car", "pedestrian", "cyclist", "traffic_sign", "traffic_light")

#: Boxes lower than this many pixels at the loaded size are flagged ``ignore``: a detector at
#: driving resolution cannot be asked to find them (KITTI's own benchmark leaves out boxes
#: under 25 px of its 375 px high images, about 17 px at 256).
MIN_BOX_HEIGHT = 8.0

#: How far (pixels) a box edge may lie outside its image before the box is refused; edges
#: within it are clipped (annotation tools write 1242.0 or 1241.5 for the last column alike).
EDGE_TOLERANCE = 1.0

Target = dict[str, torch.Tensor]


def checked_box(box: Sequence[float], image_size: tuple[int, int], where: str, shown: str) -> list[float]:
    """An xyxy ``box`` clipped to its ``(width, height)`` image, after checking it is usable.

    Args:
        box: ``x0, y0, x1, y1`` in the pixels of the original image.
        image_size: that image's ``(width, height)``.
        where: what the message names first (``file:line`` or ``file: annotation id N``).
        shown: the box as the file writes it, for the message.

    Raises:
        AnnotationError: a coordinate is not finite, the box has a negative width or height,
            or it reaches more than :data:`EDGE_TOLERANCE` pixels outside the image.
    """
    x0, y0, x1, y1 = box
    width, height = image_size
    if not all(math.isfinite(v) for v in box):
        raise AnnotationError(f"{where}: box {shown} has a coordinate that is not a number; fix or remove it")
    if x1 < x0 or y1 < y0:
        raise AnnotationError(
            f"{where}: box {shown} has a negative width or height; "
            "write it as left, top, right, bottom with right >= left and bottom >= top"
        )
    tol = EDGE_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise AnnotationError(
            f"{where}: box {shown} lies outside the {width}x{height} image; clip it to the image or remove it"
        )
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]


def header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path``, from its header (nothing decoded).

    Raises:
        UserError: the file cannot be opened as an image.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def read_resized(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The RGB image at ``path`` resized to ``size`` (width, height; bilinear), as uint8
    (H, W, 3), and its original ``(width, height)``.

    Raises:
        UserError: the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            original = image.size
            return np.asarray(
                image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.uint8
            ), original
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def make_target(
    boxes: Sequence[Sequence[float]] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    ignore: Sequence[bool] | torch.Tensor | None = None,
) -> Target:
    """A target dict with the dtypes the detection task expects; tiny boxes get ``ignore``.

    Args:
        boxes: ``(n, 4)`` xyxy pixels (an empty sequence for an image without objects).
        labels: ``(n,)`` class indices.
        ignore: ``(n,)`` flags set by the annotation (crowd, don't care); tiny boxes are
            flagged on top of them.
    """
    box = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    label = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    flag = (
        torch.zeros(len(box), dtype=torch.bool)
        if ignore is None
        else torch.as_tensor(ignore, dtype=torch.bool)
    )
    tiny = (box[:, 3] - box[:, 1] < MIN_BOX_HEIGHT) | (box[:, 2] - box[:, 0] < 1.0)
    return {"boxes": box, "labels": label, "ignore": flag.reshape(-1) | tiny}


def scale_target(target: Target, sx: float, sy: float) -> Target:
    """``target`` for the image resized by ``sx`` horizontally and ``sy`` vertically (boxes
    scaled, the tiny rule applied again at the new size)."""
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    return make_target(target["boxes"] * scale, target["labels"], target["ignore"])


class BoxTensorDataset(Dataset):
    """Images in a uint8 tensor with one target per image; items are
    ``(float32 C x H x W in [0, 1], target dict)``, the target a fresh copy (a caller may
    move or edit it without changing the dataset).

    ``images`` and ``labels`` (the list of targets) are public like
    :class:`~toolchain.data.base.ImageTensorDataset`'s, and slicing both gives a dataset again.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[Target]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"need one target per image: {images.shape[0]} images, {len(labels)} targets")
        self.images = images
        self.labels = list(labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        target = {key: value.clone() for key, value in self.labels[index].items()}
        return self.images[index].float().div_(255.0), target


def collate_boxes(batch: list[Any]) -> tuple[torch.Tensor, list[Target]]:
    """A batch of detection items: the images stacked, the targets as a list (each image has
    its own number of boxes, which torch's default collate cannot stack)."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def make_box_bundle(
    name: str,
    train: BoxTensorDataset,
    val: BoxTensorDataset,
    class_names: tuple[str, ...],
    source: str | None = None,
) -> DataBundle:
    """A detection :class:`DataBundle` (``task="detection"``, ``collate`` = :func:`collate_boxes`);
    mean/std come from ``train``."""
    # make_bundle reads only ``train.images``, which a BoxTensorDataset has too.
    bundle = make_bundle(name, train, val, class_names, task="detection", source=source)  # type: ignore[arg-type]
    return replace(bundle, collate=collate_boxes)
