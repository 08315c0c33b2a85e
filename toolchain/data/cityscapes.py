"""``cityscapes``: Cityscapes-layout folders on disk (never downloaded), for segmentation.

Layout (the official one, cities as sub-folders)::

    root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

Each image is paired with the label file of the same ``<city>/<name>``. The label ids (0-33)
are mapped to the 19 train ids of the Cityscapes benchmark (road ... bicycle); every other id
becomes 255 (ignored). Images are resized to ``image_size`` x ``image_size / 2`` (bilinear;
the labels nearest-neighbour, so no id is invented), once, at load time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from toolchain.data.base import DATASETS, DataBundle, MaskTensorDataset, cap_indices, check_task, make_bundle
from toolchain.errors import DataNotFoundError, UserError

DEFAULT_WIDTH = 512
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
_LAYOUT = (
    f"expected root/leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} and root/gtFine/<split>/<city>/*{LABEL_SUFFIX}"
)

#: The 19 evaluated classes, in train-id order, and the label id each comes from.
TRAIN_CLASSES: tuple[tuple[str, int], ...] = (
    ("road", 7),
    ("sidewalk", 8),
    ("building", 11),
    ("wall", 12),
    ("fence", 13),
    ("pole", 17),
    ("traffic_light", 19),
    ("traffic_sign", 20),
    ("vegetation", 21),
    ("terrain", 22),
    ("sky", 23),
    ("person", 24),
    ("rider", 25),
    ("car", 26),
    ("truck", 27),
    ("bus", 28),
    ("train", 31),
    ("motorcycle", 32),
    ("bicycle", 33),
)
CLASS_NAMES = tuple(name for name, _ in TRAIN_CLASSES)


def _lookup() -> np.ndarray:
    """label id (0-255) -> train id, 255 for ids that are not evaluated."""
    table = np.full(256, 255, dtype=np.uint8)
    for train_id, (_, label_id) in enumerate(TRAIN_CLASSES):
        table[label_id] = train_id
    return table


LABEL_TO_TRAIN = _lookup()


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    images = root / "leftImg8bit" / split
    labels = root / "gtFine" / split
    for folder in (images, labels):
        if not folder.is_dir():
            raise DataNotFoundError(f"{folder} is not a folder; {_LAYOUT}")
    pairs = []
    for image in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
        label = labels / image.parent.name / image.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX)
        if not label.is_file():
            raise DataNotFoundError(f"{image} has no label file {label}; {_LAYOUT}")
        pairs.append((image, label))
    if not pairs:
        raise DataNotFoundError(f"no *{IMAGE_SUFFIX} images under {images}; {_LAYOUT}")
    return pairs


def _read(path: Path, size: tuple[int, int], mode: str, resample: Image.Resampling) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize(size, resample), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _split(root: Path, split: str, cap: int | None, seed: int, width: int) -> MaskTensorDataset:
    pairs = _pairs(root, split)
    keep = cap_indices(len(pairs), cap, seed, split)
    chosen = pairs if keep is None else [pairs[i] for i in keep.tolist()]
    size = (width, width // 2)
    images = np.stack([_read(image, size, "RGB", Image.Resampling.BILINEAR) for image, _ in chosen])
    labels = np.stack(
        [LABEL_TO_TRAIN[_read(label, size, "L", Image.Resampling.NEAREST)] for _, label in chosen]
    )
    return MaskTensorDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).contiguous()
    )


@DATASETS.register("cityscapes")
def load_cityscapes(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load a Cityscapes-layout folder (see the module docstring) with the 19 train classes.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/`` (required).
        image_size: the width images are resized to (height = width / 2), default 512.
        train_samples, val_samples: keep a seeded random subset of this size.

    Raises:
        DataNotFoundError: no ``root``, a missing folder or label file, or no images.
        UserError: a file cannot be decoded, or an odd or too small width.
    """
    check_task("cityscapes", task, ("segmentation",))
    if root is None:
        raise DataNotFoundError(f"dataset cityscapes needs data.root; {_LAYOUT}")
    width = image_size or DEFAULT_WIDTH
    if width < 16 or width % 2:
        raise UserError(f"cityscapes: data.image_size (the width) must be even and >= 16, got {width}")
    train = _split(Path(root), "train", train_samples, seed, width)
    val = _split(Path(root), "val", val_samples, seed, width)
    return make_bundle("cityscapes", train, val, CLASS_NAMES, task="segmentation", source=root)
