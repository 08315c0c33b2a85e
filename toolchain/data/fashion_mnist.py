"""``fashion-mnist``: Zalando's Fashion-MNIST read from its IDX ``.gz`` files (no download).

The files ship in Debian's ``dataset-fashion-mnist`` package under
``/usr/share/datasets/fashion-mnist``; ``data.root`` points elsewhere. Train is the 60000
training images, val the 10000 test images. 1 channel, 28x28 unless ``image_size`` is given.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from toolchain.data.base import (
    DATASETS,
    DataBundle,
    ImageTensorDataset,
    capped_split,
    check_task,
    make_bundle,
)
from toolchain.errors import DataNotFoundError, UserError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes.

    Args:
        path: the ``.gz`` file.
        magic: 2051 for images (N, rows, cols), 2049 for labels (N,).

    Returns:
        A uint8 array of shape (N, rows, cols) or (N,).

    Raises:
        UserError: the file is not a gzipped IDX file of that kind or is truncated.
    """
    dims = 3 if magic == _IMAGES_MAGIC else 1
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4 + 4 * dims)
            payload = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(header) < 4 + 4 * dims or struct.unpack(">I", header[:4])[0] != magic:
        raise UserError(f"{path} is not an IDX file with magic {magic}; is the download complete?")
    shape = struct.unpack(f">{dims}I", header[4:])
    if len(payload) != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} bytes, got {len(payload)}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _split(root: Path, split: str, cap: int | None, seed: int, size: int | None) -> ImageTensorDataset:
    image_file, label_file = (root / name for name in _FILES[split])
    images = torch.from_numpy(read_idx(image_file, _IMAGES_MAGIC).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(label_file, _LABELS_MAGIC).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{image_file} has {images.shape[0]} images, {label_file} {labels.shape[0]} labels")
    return capped_split(images, labels, cap, seed, split, size)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load Fashion-MNIST from ``root`` (default ``/usr/share/datasets/fashion-mnist``).

    Args:
        root: folder holding the four IDX ``.gz`` files.
        image_size: resize from 28 to this size (bilinear, antialiased).
        train_samples, val_samples: keep a random subset of this size (fixed by ``seed``).
        seed: chooses the subsets.

    Returns:
        A 1-channel :class:`DataBundle`; mean/std measured on (up to 2000) training images.

    Raises:
        DataNotFoundError: a file is missing; the message says how to install it.
        UserError: a file is corrupt.
    """
    check_task("fashion-mnist", task, ("classification",))
    folder = Path(root or DEFAULT_ROOT)
    missing = [name for names in _FILES.values() for name in names if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found: {folder / missing[0]} is missing; "
            "run `apt-get install dataset-fashion-mnist` or pass data.root=<folder with the IDX .gz files>"
        )
    train = _split(folder, "train", train_samples, seed, image_size)
    val = _split(folder, "val", val_samples, seed, image_size)
    return make_bundle("fashion-mnist", train, val, CLASS_NAMES, source=folder)
