"""``coco``: a COCO-layout detection folder on disk (never downloaded).

Layout (the official one)::

    root/annotations/instances_<train>.json    root/<train>/<file_name>
    root/annotations/instances_<val>.json      root/<val>/<file_name>

where ``<train>`` starts with ``train`` and ``<val>`` with ``val`` (``train2017``,
``val2017``), one file each; each image is read from the folder named like its annotation
file (``file_name`` as the JSON gives it). Annotations are read with :mod:`json` (no code
runs). Boxes are COCO's ``[x, y, width, height]`` in pixels of the original image, turned into
``x0, y0, x1, y1``; ``iscrowd: 1`` makes a box ``ignore``. Categories are mapped to contiguous
classes in the order of their ids (COCO's 80 ids 1..90 become 0..79), named as the JSON
names them; the validation file must have the same categories. Images are resized to
``image_size`` x ``image_size`` (default 320) once, at load time, with the boxes; boxes under
8 px high at that size are flagged ``ignore`` too. An image without annotations is an image
without objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain.data.base import DATASETS, DataBundle, cap_indices, check_task
from toolchain.data.boxes import (
    BoxTensorDataset,
    Target,
    checked_box,
    make_box_bundle,
    make_target,
    read_resized,
    scale_target,
)
from toolchain.errors import AnnotationError, DataNotFoundError, UserError

DEFAULT_SIZE = 320
_LAYOUT = "expected root/annotations/instances_<train*|val*>.json and the images in root/<train*|val*>/"


def _annotation_file(root: Path, split: str) -> Path:
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataNotFoundError(
            f"need one annotations/instances_{split}*.json under {root}, found {names}; {_LAYOUT}"
        )
    return found[0]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix or re-export the file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc}); fix or re-export the file") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in keys):
        raise AnnotationError(
            f"{path}: a COCO instances file needs the lists {', '.join(keys)}; re-export it"
        )
    return data


def _categories(path: Path, data: dict[str, Any]) -> dict[int, tuple[int, str]]:
    """category id -> (contiguous class index, name), in the order of the ids."""
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise AnnotationError(
            f"{path}: every category needs an integer id and a name; fix the categories"
        ) from None
    if not pairs:
        raise AnnotationError(f"{path}: no categories; a detection dataset needs at least one")
    return {cid: (index, name) for index, (cid, name) in enumerate(pairs)}


@dataclass(frozen=True)
class _Split:
    """One annotation file read and checked: each image's file name, size and target (in its
    original pixels), and the categories."""

    files: list[tuple[int, str]]
    sizes: dict[int, tuple[int, int]]
    targets: dict[int, Target]
    classes: dict[int, tuple[int, str]]


def _index(path: Path, data: dict[str, Any]) -> _Split:
    """Every image and annotation of ``data`` checked (see :func:`checked_box`)."""
    classes = _categories(path, data)
    try:
        files = sorted((int(image["id"]), str(image["file_name"])) for image in data["images"])
        sizes = {int(image["id"]): (int(image["width"]), int(image["height"])) for image in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{path}: an image lacks an integer id, width, height or file_name ({exc!r}); fix it"
        ) from None
    rows: dict[int, tuple[list[list[float]], list[int], list[bool]]] = {i: ([], [], []) for i in sizes}
    for ann in data["annotations"]:
        box, label, crowd = _annotation(path, ann, sizes, classes)
        rows[ann["image_id"]][0].append(box)
        rows[ann["image_id"]][1].append(label)
        rows[ann["image_id"]][2].append(crowd)
    targets = {image_id: make_target(*row) for image_id, row in rows.items()}
    return _Split(files, sizes, targets, classes)


def _annotation(
    path: Path, ann: Any, sizes: dict[int, tuple[int, int]], classes: dict[int, tuple[int, str]]
) -> tuple[list[float], int, bool]:
    """One annotation's xyxy box (clipped), class index and crowd flag.

    Raises:
        AnnotationError: an unknown image or category, or a bbox that is not four numbers,
            negative in size, or outside its image (the message names the annotation id).
    """
    if not isinstance(ann, dict):
        raise AnnotationError(f"{path}: annotation {ann!r} is not an object; fix it")
    where = f"{path}: annotation id {ann.get('id', '?')}"
    image_id, category, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    if image_id not in sizes:
        raise AnnotationError(
            f"{where}: image_id {image_id} is not among the file's images; fix or remove it"
        )
    if category not in classes:
        known = ", ".join(str(c) for c in classes)
        raise AnnotationError(
            f"{where}: unknown category_id {category} (categories: {known}); fix it or add it"
        )
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        raise AnnotationError(f"{where}: bbox {bbox} is not [x, y, width, height]; fix it")
    x, y, w, h = (float(v) for v in bbox)
    box = checked_box([x, y, x + w, y + h], sizes[image_id], where, f"[x, y, w, h] = {bbox}")
    return box, classes[category][0], bool(ann.get("iscrowd", 0))


def _read_split(
    root: Path, split: str, cap: int | None, seed: int, size: int
) -> tuple[BoxTensorDataset, _Split]:
    path = _annotation_file(root, split)
    index = _index(path, _load_json(path))
    if not index.files:
        raise DataNotFoundError(f"{path} lists no images; {_LAYOUT}")
    keep = cap_indices(len(index.files), cap, seed, split)
    chosen = index.files if keep is None else [index.files[i] for i in keep.tolist()]
    folder = root / path.stem.removeprefix("instances_")
    pictures, targets = [], []
    for image_id, name in chosen:
        if not (folder / name).is_file():
            raise AnnotationError(
                f"{path}: image id {image_id}: {folder / name} does not exist; add it or remove the image"
            )
        picture, original = read_resized(folder / name, (size, size))
        if original != index.sizes[image_id]:
            listed = index.sizes[image_id]
            raise AnnotationError(
                f"{path}: image id {image_id} is listed as {listed[0]}x{listed[1]} but {folder / name} is "
                f"{original[0]}x{original[1]}; fix its width/height or the image"
            )
        pictures.append(picture)
        targets.append(scale_target(index.targets[image_id], size / original[0], size / original[1]))
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()
    return BoxTensorDataset(images, targets), index


@DATASETS.register("coco")
def load_coco(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load a COCO-layout folder (see the module docstring for the layout and the rules).

    Args:
        root: the folder holding ``annotations/`` and the image folders (required).
        image_size: the square size images are resized to, default 320.
        train_samples, val_samples: keep a seeded random subset of this size.
        task: ``detection`` (the only one).

    Raises:
        DataNotFoundError: no ``root``, no (or more than one) annotation file per split, or no images.
        AnnotationError: an unreadable annotation file, a bad box, an unknown category, a
            missing image (the message names the file and the annotation or image id).
        UserError: an image cannot be decoded, or a size below 16.
    """
    check_task("coco", task, ("detection",))
    if root is None:
        raise DataNotFoundError(f"dataset coco needs data.root; {_LAYOUT}")
    size = image_size or DEFAULT_SIZE
    if size < 16:
        raise UserError(f"coco: data.image_size must be >= 16, got {size}")
    train, train_index = _read_split(Path(root), "train", train_samples, seed, size)
    val, val_index = _read_split(Path(root), "val", val_samples, seed, size)
    if val_index.classes != train_index.classes:
        raise AnnotationError(
            f"{_annotation_file(Path(root), 'val')}: its categories differ from the training file's; "
            "use the same list in both"
        )
    names = tuple(name for _, name in train_index.classes.values())
    return make_box_bundle("coco", train, val, names, source=root)
