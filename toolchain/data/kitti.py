"""``kitti``: a KITTI object-detection folder on disk (never downloaded), for detection.

Layout (the official ``training/`` folder, or its two sub-folders directly under ``root``)::

    root/training/image_2/<id>.png        root/training/label_2/<id>.txt
    root/ImageSets/train.txt, val.txt     (optional: one <id> per line)

Each label line is KITTI's object format: ``type truncated occluded alpha left top right
bottom h w l x y z rotation_y`` (a 16th value, a score, is allowed), with the box in pixels of
the original image. Classes map to ``car, pedestrian, cyclist, traffic_sign, traffic_light``
(KITTI labels no signs or lights, so those two have no ground truth here):

* ``Car`` -> car, ``Pedestrian`` -> pedestrian, ``Cyclist`` -> cyclist;
* ``Van`` -> car and ``Person_sitting`` -> pedestrian, flagged ``ignore``: KITTI's benchmark
  neither rewards nor punishes finding these neighbouring classes;
* ``Truck``, ``Tram``, ``Misc`` -> car flagged ``ignore`` (vehicles without a class here);
* ``DontCare`` -> an ``ignore`` region for every class (one box per class).

Split rule: with ``ImageSets/train.txt`` and ``val.txt`` (e.g. the 3712/3769 split of Chen et
al. 2015, which keeps drives apart) those ids; otherwise the ids sorted, the last tenth (at
least one) for validation and the rest for training. Images are resized to ``image_size`` x
``image_size / 2`` (default 512 x 256) once, at load time, and the boxes scaled with them;
boxes under 8 px high at that size are flagged ``ignore`` too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolchain.data.base import DATASETS, DataBundle, cap_indices, check_task
from toolchain.data.boxes import (
    DETECTION_CLASSES,
    BoxTensorDataset,
    Target,
    checked_box,
    header_size,
    make_box_bundle,
    make_target,
    read_resized,
    scale_target,
)
from toolchain.errors import AnnotationError, DataNotFoundError, UserError

DEFAULT_WIDTH = 512
VAL_SHARE = 10  # without ImageSets files, the last 1/VAL_SHARE of the sorted ids is validation
EXTENSIONS = (".png", ".jpg", ".jpeg")
_LAYOUT = "expected root/training/image_2/<id>.png and root/training/label_2/<id>.txt (KITTI object format)"
_EVERY_CLASS = -1  # a DontCare region: one ignored box per class

#: KITTI type -> (our class index or _EVERY_CLASS, ignore).
KITTI_CLASSES: dict[str, tuple[int, bool]] = {
    "Car": (0, False),
    "Van": (0, True),
    "Truck": (0, True),
    "Tram": (0, True),
    "Misc": (0, True),
    "Pedestrian": (1, False),
    "Person_sitting": (1, True),
    "Cyclist": (2, False),
    "DontCare": (_EVERY_CLASS, True),
}


def _folders(root: Path) -> tuple[Path, Path]:
    base = root / "training" if (root / "training" / "image_2").is_dir() else root
    images, labels = base / "image_2", base / "label_2"
    for folder in (images, labels):
        if not folder.is_dir():
            raise DataNotFoundError(f"{folder} is not a folder; {_LAYOUT}")
    return images, labels


def _split_ids(root: Path, images: Path) -> dict[str, list[str]]:
    """Image ids of the train and val splits (see the module docstring for the rule)."""
    ids = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if len(ids) < 2:
        raise DataNotFoundError(
            f"{images} holds {len(ids)} image(s), a train and a val split need 2; {_LAYOUT}"
        )
    lists = {split: root / "ImageSets" / f"{split}.txt" for split in ("train", "val")}
    if all(path.is_file() for path in lists.values()):
        known = set(ids)
        chosen = {split: path.read_text().split() for split, path in lists.items()}
        for split, names in chosen.items():
            missing = [name for name in names if name not in known]
            if missing:
                raise DataNotFoundError(
                    f"{lists[split]} lists {missing[0]} ({len(missing)} missing in all) but {images} "
                    "has no such image; fix the list or add the image"
                )
            if not names:
                raise DataNotFoundError(f"{lists[split]} lists no image; add ids, one per line")
        return chosen
    cut = len(ids) - max(1, len(ids) // VAL_SHARE)
    return {"train": ids[:cut], "val": ids[cut:]}


def parse_label_file(path: Path, image_size: tuple[int, int]) -> Target:
    """The target of one KITTI label file, in the pixels of its ``(width, height)`` image.

    Raises:
        AnnotationError: the file is not text, a line without 15 or 16 values, a value that is
            not a number, an unknown type, or a box outside the image or of negative size
            (``file:line`` first).
    """
    boxes: list[list[float]] = []
    labels: list[int] = []
    ignore: list[bool] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            f"{path}: cannot read it as text ({exc}); replace it with a KITTI label file"
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) not in (15, 16):
            raise AnnotationError(
                f"{where}: {len(fields)} values, KITTI object labels have 15 "
                "(type truncated occluded alpha left top right bottom h w l x y z rotation_y); fix the line"
            )
        if fields[0] not in KITTI_CLASSES:
            raise AnnotationError(
                f"{where}: unknown class {fields[0]!r}; KITTI classes: {', '.join(KITTI_CLASSES)}; "
                "fix the name or remove the line"
            )
        shown = " ".join(fields[4:8])
        try:
            corners = [float(v) for v in fields[4:8]]
        except ValueError:
            raise AnnotationError(f"{where}: box {shown} is not four numbers; fix the line") from None
        box = checked_box(corners, image_size, where, shown)
        cls, flagged = KITTI_CLASSES[fields[0]]
        for label in range(len(DETECTION_CLASSES)) if cls == _EVERY_CLASS else (cls,):
            boxes.append(box)
            labels.append(label)
            ignore.append(flagged)
    return make_target(boxes, labels, ignore)


def _checked_labels(images: Path, labels: Path, ids: list[str]) -> dict[str, tuple[Path, Target]]:
    """Each id's image path and target (in original pixels), every label file of the split
    checked, so a bad line fails the load whichever images a sample cap keeps; only the image
    headers are read, for their sizes."""
    out = {}
    for name in ids:
        image = next(p for ext in EXTENSIONS if (p := images / f"{name}{ext}").is_file())
        label = labels / f"{name}.txt"
        if not label.is_file():
            raise AnnotationError(
                f"{image} has no label file {label}; add it (an empty file for an image without objects) "
                "or remove the image"
            )
        out[name] = (image, parse_label_file(label, header_size(image)))
    return out


def _read_split(
    checked: dict[str, tuple[Path, Target]], ids: list[str], size: tuple[int, int]
) -> BoxTensorDataset:
    pictures, targets = [], []
    for name in ids:
        image, target = checked[name]
        picture, original = read_resized(image, size)
        pictures.append(picture)
        targets.append(scale_target(target, size[0] / original[0], size[1] / original[1]))
    return BoxTensorDataset(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous(), targets)


@DATASETS.register("kitti")
def load_kitti(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load a KITTI object folder (see the module docstring for the layout, classes and split).

    Args:
        root: the folder holding ``training/`` (or ``image_2/`` and ``label_2/``); required.
        image_size: the width images are resized to (height = width / 2), default 512.
        train_samples, val_samples: keep a seeded random subset of this size.
        task: ``detection`` (the only one).

    Raises:
        DataNotFoundError: no ``root``, a missing folder, too few images, or an ImageSets list
            naming an image that is not there.
        AnnotationError: an image without its label file, or an unusable label line.
        UserError: an image cannot be decoded, or an odd or too small width.
    """
    check_task("kitti", task, ("detection",))
    if root is None:
        raise DataNotFoundError(f"dataset kitti needs data.root; {_LAYOUT}")
    width = image_size or DEFAULT_WIDTH
    if width < 16 or width % 2:
        raise UserError(f"kitti: data.image_size (the width) must be even and >= 16, got {width}")
    images, labels = _folders(Path(root))
    splits = _split_ids(Path(root), images)
    caps = {"train": train_samples, "val": val_samples}
    data = {}
    for split, ids in splits.items():
        keep = cap_indices(len(ids), caps[split], seed, split)
        chosen = ids if keep is None else [ids[i] for i in keep.tolist()]
        data[split] = _read_split(_checked_labels(images, labels, ids), chosen, (width, width // 2))
    return make_box_bundle("kitti", data["train"], data["val"], DETECTION_CLASSES, source=root)
