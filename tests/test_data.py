"""Datasets: the procedural signs generator, Fashion-MNIST IDX files, image folders, CIFAR-10 batches."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from toolchain.data import DATASETS, DataBundle, load_data
from toolchain.data.signs import CLASS_NAMES as SIGN_NAMES
from toolchain.data.signs import generate
from toolchain.errors import DataNotFoundError, UnknownNameError, UserError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_has_the_eight_datasets_and_rejects_unknown_names() -> None:
    assert DATASETS.names() == [
        "cifar10",
        "cityscapes",
        "coco",
        "driving-scenes",
        "fashion-mnist",
        "image-folder",
        "kitti",
        "signs",
    ]
    with pytest.raises(
        UnknownNameError,
        match="known: cifar10, cityscapes, coco, driving-scenes, fashion-mnist, image-folder, kitti, signs",
    ):
        load_data("sings")


# --- signs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signs() -> DataBundle:
    return load_data("signs", train_samples=240, val_samples=120, seed=0)


def test_signs_shapes_range_and_metadata(signs: DataBundle) -> None:
    assert (len(signs.train), len(signs.val)) == (240, 120)
    assert signs.num_classes == len(signs.class_names) == 12 >= 10
    assert (signs.channels, signs.image_size, signs.name) == (3, 32, "signs")
    image, label = signs.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 12
    pixels = signs.train.images  # type: ignore[attr-defined]
    assert pixels.dtype == torch.uint8 and pixels.shape == (240, 3, 32, 32)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # Real scenes use most of the range; a constant image would mean a broken renderer.
    assert len(torch.unique(pixels)) > 200
    assert len(signs.mean) == len(signs.std) == 3
    assert all(0.2 < m < 0.8 for m in signs.mean) and all(0.1 < s < 0.4 for s in signs.std)


def test_signs_same_seed_is_bitwise_equal_and_other_seeds_differ() -> None:
    a_images, a_labels = generate(150, seed=7)
    b_images, b_labels = generate(150, seed=7)
    c_images, _ = generate(150, seed=8)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert (a_images != c_images).float().mean() > 0.5


def test_signs_are_prefix_stable_and_train_val_use_different_streams(signs: DataBundle) -> None:
    images, labels = generate(300, seed=3)
    first, first_labels = generate(140, seed=3)
    assert torch.equal(images[:140], first) and torch.equal(labels[:140], first_labels)
    train, val = signs.train.images, signs.val.images  # type: ignore[attr-defined]
    assert (train[:120] != val).float().mean() > 0.5


def test_signs_classes_are_balanced(signs: DataBundle) -> None:
    for split in (signs.train, signs.val):
        counts = torch.bincount(split.labels, minlength=12)  # type: ignore[attr-defined]
        assert int(counts.max() - counts.min()) <= 1 and int(counts.min()) >= 10


def test_signs_defaults_and_image_size() -> None:
    bundle = load_data("signs", image_size=48, train_samples=24, val_samples=12)
    assert bundle.train[0][0].shape == (3, 48, 48) and bundle.image_size == 48
    assert SIGN_NAMES[0] == "stop" and len(set(SIGN_NAMES)) == 12


def test_signs_are_learnable_but_not_trivial() -> None:
    # A nearest-class-mean classifier on 8x8 thumbnails: well above chance (1/12) because the
    # classes differ in colour and shape, far below perfect because position, scale, clutter
    # and lighting vary (measured about 0.27).
    bundle = load_data("signs", train_samples=600, val_samples=300, seed=1)

    def features(split: torch.utils.data.Dataset) -> torch.Tensor:
        return F.avg_pool2d(split.images.float() / 255, 4).flatten(1)  # type: ignore[attr-defined]

    train_x, val_x = features(bundle.train), features(bundle.val)
    train_y, val_y = bundle.train.labels, bundle.val.labels  # type: ignore[attr-defined]
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(12)])
    accuracy = float((torch.cdist(val_x, centroids).argmin(1) == val_y).float().mean())
    assert 0.14 < accuracy < 0.6


# --- fashion-mnist ------------------------------------------------------------------------------


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4I", 2051, *images.shape) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 2049, labels.shape[0]) + labels.tobytes())


@needs_fashion
def test_fashion_mnist_loads_the_installed_files() -> None:
    bundle = load_data("fashion-mnist")
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    assert (bundle.channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert bundle.class_names[0] == "T-shirt/top" and bundle.class_names[9] == "Ankle boot"
    image, label = bundle.val[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    # The published training-set mean/std are 0.2860/0.3530; ours use 2000 images.
    assert abs(bundle.mean[0] - 0.286) < 0.01 and abs(bundle.std[0] - 0.353) < 0.01


@needs_fashion
def test_fashion_mnist_caps_are_seeded_subsets_and_resize_works() -> None:
    a = load_data("fashion-mnist", train_samples=500, val_samples=100, image_size=32, seed=1)
    b = load_data("fashion-mnist", train_samples=500, val_samples=100, image_size=32, seed=1)
    c = load_data("fashion-mnist", train_samples=500, val_samples=100, image_size=32, seed=2)
    assert (len(a.train), len(a.val), a.image_size) == (500, 100, 32)
    assert a.train[0][0].shape == (1, 32, 32)
    assert torch.equal(a.train.images, b.train.images)  # type: ignore[attr-defined]
    assert not torch.equal(a.train.labels, c.train.labels)  # type: ignore[attr-defined]


def test_fashion_mnist_reads_idx_files_from_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 8)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path, prefix, images, (np.arange(n) % 10).astype(np.uint8))
    bundle = load_data("fashion-mnist", root=str(tmp_path))
    assert (len(bundle.train), len(bundle.val)) == (30, 8)
    assert bundle.train.labels.tolist() == [i % 10 for i in range(30)]  # type: ignore[attr-defined]


def test_fashion_mnist_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_data("fashion-mnist", root=str(tmp_path))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message


def test_fashion_mnist_corrupt_file_is_a_user_error(tmp_path: Path) -> None:
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if "images" in name else "idx1"
        with gzip.open(tmp_path / f"{name}-{kind}-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not an IDX file"):
        load_data("fashion-mnist", root=str(tmp_path))


# --- image-folder -------------------------------------------------------------------------------

_COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in _COLOURS.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                # Mixed sizes, modes and formats: everything must come out RGB at one size.
                if i % 2:
                    Image.new("RGB", (40 + i, 30), colour).save(folder / f"{i}.png")
                else:
                    Image.new("RGBA", (20, 20), (*colour, 255)).convert("RGB").save(folder / f"{i}.jpg")
            (folder / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_reads_classes_resizes_and_labels(image_root: Path) -> None:
    bundle = load_data("image-folder", root=str(image_root))
    assert bundle.class_names == ("cat", "dog", "emu") and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), bundle.channels, bundle.image_size) == (12, 6, 3, 32)
    for image, label in (bundle.train[i] for i in range(12)):
        assert image.shape == (3, 32, 32)
        # Solid-colour images: the brightest channel tells the class.
        assert int(image.mean(dim=(1, 2)).argmax()) == label
    small = load_data("image-folder", root=str(image_root), image_size=16, train_samples=5)
    assert small.train[0][0].shape == (3, 16, 16) and len(small.train) == 5


def test_image_folder_gray_images_become_rgb(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("L", (10, 10), 128).save(tmp_path / split / "only" / "a.png")
    bundle = load_data("image-folder", root=str(tmp_path), image_size=8)
    image, label = bundle.val[0]
    assert image.shape == (3, 8, 8) and label == 0
    assert torch.allclose(image, torch.full_like(image, 128 / 255))


def test_image_folder_missing_or_empty_names_the_layout(tmp_path: Path, image_root: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    for root, expected in (
        (None, "needs data.root"),
        (tmp_path / "nope", "is not a folder"),
        (empty, "no images"),
    ):
        with pytest.raises(DataNotFoundError, match=expected) as info:
            load_data("image-folder", root=None if root is None else str(root))
        assert "root/train/<class>" in str(info.value)
    (image_root / "val" / "yak").mkdir()
    Image.new("RGB", (8, 8)).save(image_root / "val" / "yak" / "0.png")
    with pytest.raises(UserError, match="yak"):
        load_data("image-folder", root=str(image_root))


# --- cifar10 ------------------------------------------------------------------------------------


def _write_cifar(folder: Path, per_batch: int = 20, *, protocol: int = 2, bytes_keys: bool = True) -> None:
    """Batches in the published layout: dict of data (N, 3072) uint8 and a list of labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            key("batch_label"): key(name),
            key("labels"): [int(x) for x in rng.integers(0, 10, per_batch)],
            key("data"): rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            key("filenames"): [key(f"{i}.png") for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    names = [key(n) for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (folder / "batches.meta").write_bytes(pickle.dumps({key("label_names"): names}, protocol=protocol))


@pytest.mark.parametrize(("protocol", "bytes_keys"), [(2, True), (5, False)])
def test_cifar10_reads_the_on_disk_batches(tmp_path: Path, protocol: int, bytes_keys: bool) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol, bytes_keys=bytes_keys)
    bundle = load_data("cifar10", root=str(tmp_path))
    assert (len(bundle.train), len(bundle.val), bundle.channels, bundle.image_size) == (100, 20, 3, 32)
    assert bundle.class_names[:2] == ("plane", "car")
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    data = raw[b"data" if bytes_keys else "data"]
    labels = raw[b"labels" if bytes_keys else "labels"]
    image, label = bundle.train[0]
    assert torch.equal(image, torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255)
    assert label == labels[0]
    capped = load_data("cifar10", root=str(tmp_path), train_samples=30, image_size=16)
    assert len(capped.train) == 30 and capped.train[0][0].shape == (3, 16, 16)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.target),)


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    target = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(target)}, protocol=2))
    with pytest.raises(UserError, match="is not allowed"):
        load_data("cifar10", root=str(tmp_path))
    assert not target.exists()


def test_cifar10_missing_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py") as info:
        load_data("cifar10", root=str(tmp_path))
    assert "data_batch_1" in str(info.value) and "nothing is downloaded" in str(info.value)
    with pytest.raises(DataNotFoundError, match=r"needs data\.root"):
        load_data("cifar10")


def test_holdout_is_carved_from_train_and_disjoint_from_it() -> None:
    from toolchain.data import load_data

    whole = load_data("signs", train_samples=150, val_samples=10, seed=3)
    split = load_data("signs", train_samples=120, holdout=30, seed=3)
    assert (len(split.train), len(split.val)) == (120, 30)
    assert torch.equal(split.train.images, whole.train.images[:120])
    assert torch.equal(split.val.images, whole.train.images[120:])
    from toolchain.data import _hold_out

    with pytest.raises(UserError, match="leaves no training image"):
        _hold_out(whole, 150)
