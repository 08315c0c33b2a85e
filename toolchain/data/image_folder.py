"""``image-folder``: your own images, one sub-folder per class, read with PIL.

Layout::

    root/train/<class name>/*.png|jpg|jpeg|bmp|webp
    root/val/<class name>/...

Class names are the sorted sub-folders of ``train/``; ``val/`` may lack some classes but
not add new ones. Images are converted to RGB and resized to ``image_size`` (default 32)
once, at load time, into a uint8 tensor, so an epoch costs no decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from toolchain.data.base import (
    DATASETS,
    DataBundle,
    ImageTensorDataset,
    cap_indices,
    check_task,
    make_bundle,
    split_seed,
)
from toolchain.errors import DataNotFoundError, UserError

DEFAULT_SIZE = 32
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_LAYOUT = "expected root/train/<class>/*.png|jpg and root/val/<class>/*.png|jpg"


def _list_split(folder: Path, class_names: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in class_names:
            raise UserError(
                f"{class_dir} is a class that train/ does not have; train classes: {', '.join(class_names)}"
            )
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        paths.extend(files)
        labels.extend([class_names.index(class_dir.name)] * len(files))
    if not paths:
        raise DataNotFoundError(f"no images under {folder}; {_LAYOUT}")
    return paths, labels


def _read(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def _split(
    folder: Path, class_names: tuple[str, ...], cap: int | None, seed: int, size: int, split: str
) -> ImageTensorDataset:
    paths, labels = _list_split(folder, class_names)
    keep = cap_indices(len(paths), cap, seed, split)
    order = range(len(paths)) if keep is None else keep.tolist()
    # The file list is sorted by class; shuffle once (by seed) so the first images, which
    # mean/std are measured on, cover every class.
    generator = torch.Generator().manual_seed(split_seed(seed, f"order-{split}"))
    order = [order[i] for i in torch.randperm(len(order), generator=generator)]
    images = np.stack([_read(paths[i], size) for i in order])
    return ImageTensorDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([labels[i] for i in order], dtype=torch.int64),
    )


@DATASETS.register("image-folder")
def load_image_folder(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load a folder of class sub-folders (see the module docstring for the layout).

    Args:
        root: the folder holding ``train/`` and ``val/`` (required).
        image_size: square size every image is resized to, default 32.
        train_samples, val_samples: keep a random subset of this size (fixed by ``seed``).
        seed: chooses the subsets and their order.

    Returns:
        A 3-channel :class:`DataBundle`; mean/std measured on (up to 2000) training images.

    Raises:
        DataNotFoundError: ``root`` is not given, a split folder is missing or has no images.
        UserError: an image cannot be decoded, or ``val/`` has a class ``train/`` lacks.
    """
    check_task("image-folder", task, ("classification",))
    if root is None:
        raise DataNotFoundError(f"dataset image-folder needs data.root; {_LAYOUT}")
    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataNotFoundError(f"{base / split} is not a folder; {_LAYOUT}")
    class_names = tuple(sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))
    if not class_names:
        raise DataNotFoundError(f"no class folders under {base / 'train'}; {_LAYOUT}")
    size = image_size or DEFAULT_SIZE
    train = _split(base / "train", class_names, train_samples, seed, size, "train")
    val = _split(base / "val", class_names, val_samples, seed, size, "val")
    return make_bundle("image-folder", train, val, class_names, source=base)
