"""``cifar10``: CIFAR-10 from torchvision's on-disk layout; never downloads.

Layout: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (``root``
may also be the ``cifar-10-batches-py`` folder itself). Train is the five data batches,
val the test batch; 3 channels, 32x32 unless ``image_size`` is given.

The batches are Python pickles because that is the format CIFAR publishes. A pickle can
run arbitrary code, so they are read with :class:`_BatchUnpickler`, which resolves only
the few globals a CIFAR batch needs (numpy array and dtype reconstruction, and latin-1
``_codecs.encode`` used by protocol-2 pickles for bytes) and refuses everything else.
Only files under the root the user named are opened.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

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

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILES = ("test_batch",)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if encoding.replace("-", "").lower() not in {"latin1", "iso88591"}:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, encoding, errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # numpy 2 moved numpy.core to numpy._core (the old name warns); use whichever is real.
    for core in ("numpy._core", "numpy.core"):
        try:
            multiarray = importlib.import_module(f"{core}.multiarray")
            numeric = importlib.import_module(f"{core}.numeric")
            break
        except ImportError:
            continue
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Files pickled under numpy 1 name numpy.core, under numpy 2 numpy._core: accept both.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can only build dicts, lists, strings, numbers and numpy arrays."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch") from None


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as exc:
        raise UserError(f"{path} is not a readable CIFAR batch: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR batch: it holds a {type(raw).__name__}, not a dict")
    # encoding="bytes" turns Python 2 str keys into bytes; Python 3 pickles have str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        batch = _load_pickle(folder / name)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            raise UserError(f"{folder / name}: 'data' must be a uint8 array of shape (N, 3072)")
        if not isinstance(batch_labels, list | np.ndarray) or len(batch_labels) != data.shape[0]:
            raise UserError(f"{folder / name}: 'labels' must list one label per image")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(np.asarray(batch_labels, dtype=np.int64)))
    return torch.cat(images), torch.cat(labels)


def _class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return CLASS_NAMES
    names = _load_pickle(meta).get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES):
        return CLASS_NAMES
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _split(
    folder: Path, names: tuple[str, ...], cap: int | None, seed: int, size: int | None, split: str
) -> ImageTensorDataset:
    images, labels = _read_batches(folder, names)
    return capped_split(images, labels, cap, seed, split, size)


@DATASETS.register("cifar10")
def load_cifar10(
    *,
    root: str | None = None,
    image_size: int | None = None,
    train_samples: int | None = None,
    val_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
) -> DataBundle:
    """Load CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's format); never downloads.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (or that folder itself).
        image_size: resize from 32 to this size (bilinear, antialiased).
        train_samples, val_samples: keep a random subset of this size (fixed by ``seed``).
        seed: chooses the subsets.

    Returns:
        A 3-channel :class:`DataBundle`; mean/std measured on (up to 2000) training images.

    Raises:
        DataNotFoundError: ``root`` is not given or a batch file is missing.
        UserError: a batch is corrupt or contains anything but plain data.
    """
    check_task("cifar10", task, ("classification",))
    if root is None:
        raise DataNotFoundError(
            f"dataset cifar10 needs data.root: the folder holding {FOLDER}/ (torchvision's format; "
            "nothing is downloaded)"
        )
    folder = Path(root) / FOLDER
    if not folder.is_dir() and (Path(root) / TRAIN_FILES[0]).is_file():
        folder = Path(root)
    missing = [name for name in TRAIN_FILES + VAL_FILES if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found: {folder / missing[0]} is missing; expected {Path(root) / FOLDER}/"
            "{data_batch_1..5,test_batch} (torchvision's format; nothing is downloaded)"
        )
    train = _split(folder, TRAIN_FILES, train_samples, seed, image_size, "train")
    val = _split(folder, VAL_FILES, val_samples, seed, image_size, "val")
    return make_bundle("cifar10", train, val, _class_names(folder), source=folder)
