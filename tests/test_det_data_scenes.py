"""``driving-scenes`` for detection: boxes of the visible pixels of each drawn object, classes as
drawn, tiny objects ignored, the segmentation scenes unchanged, the bundle the task batches."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from torch.utils.data import DataLoader

from toolchain.data import BoxTensorDataset, load_data
from toolchain.data.boxes import MIN_BOX_HEIGHT, collate_boxes
from toolchain.data.driving_scenes import (
    BUILDING,
    DETECTION_CLASSES,
    IGNORE,
    MIN_VISIBLE,
    PEDESTRIAN,
    SIGN,
    VEHICLE,
    Plant,
    render_detection_scene,
    render_split,
)
from toolchain.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 128, 256
CAR, PERSON, CYCLIST, SIGN_BOX, LIGHT = range(5)
#: The segmentation classes an object's visible pixels may carry (lights are 255: no such class).
PIXEL_CLASSES = {
    CAR: {VEHICLE},
    PERSON: {PEDESTRIAN},
    CYCLIST: {PEDESTRIAN, VEHICLE},
    SIGN_BOX: {SIGN},
    LIGHT: {IGNORE},
}


def _scene(seed: int, plant: Plant | None = None):  # type: ignore[no-untyped-def]
    return render_detection_scene(H, W, torch.Generator().manual_seed(seed), plant=plant)


def _inside(boxes: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Whether each pixel (its centre) lies in any of ``boxes``."""
    cy, cx = ys.float() + 0.5, xs.float() + 0.5
    return (
        (cx[:, None] > boxes[None, :, 0])
        & (cx[:, None] < boxes[None, :, 2])
        & (cy[:, None] > boxes[None, :, 1])
        & (cy[:, None] < boxes[None, :, 3])
    ).any(1)


@pytest.fixture(scope="module")
def scenes():  # type: ignore[no-untyped-def]
    return [_scene(seed) for seed in range(24)]


def test_each_box_is_the_tight_box_of_its_objects_visible_pixels(scenes) -> None:  # type: ignore[no-untyped-def]
    boxes_seen = 0
    for scene in scenes:
        boxes, labels = scene.target["boxes"], scene.target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        visible = [k for k in range(len(scene.kinds)) if bool((scene.instances == k).any())]
        assert len(visible) == len(boxes)  # hidden objects have no box, visible ones one each
        for box, label, k in zip(boxes, labels.tolist(), visible):
            ys, xs = torch.nonzero(scene.instances == k, as_tuple=True)
            want = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in want]
            assert set(scene.label[ys, xs].unique().tolist()) <= PIXEL_CLASSES[label]
            boxes_seen += 1
    assert boxes_seen > 60


def test_every_object_pixel_of_the_segmentation_mask_lies_in_a_box_of_its_class(scenes) -> None:  # type: ignore[no-untyped-def]
    """Checked from the per-pixel classes, independently of the object map: no drawn vehicle,
    pedestrian or sign pixel is left outside the boxes of the classes that draw it."""
    owners = {VEHICLE: [CAR, CYCLIST], PEDESTRIAN: [PERSON, CYCLIST], SIGN: [SIGN_BOX]}
    for scene in scenes:
        boxes, labels = scene.target["boxes"], scene.target["labels"]
        for pixel_class, classes in owners.items():
            ys, xs = torch.nonzero(scene.label == pixel_class, as_tuple=True)
            mine = boxes[torch.isin(labels, torch.tensor(classes))]
            assert bool(_inside(mine, ys, xs).all())


def test_all_five_classes_are_drawn_and_tiny_or_mostly_hidden_objects_are_ignored(scenes) -> None:  # type: ignore[no-untyped-def]
    labels = torch.cat([s.target["labels"] for s in scenes])
    assert set(labels.tolist()) == set(range(len(DETECTION_CLASSES)))
    boxes = torch.cat([s.target["boxes"] for s in scenes])
    ignore = torch.cat([s.target["ignore"] for s in scenes])
    tiny = boxes[:, 3] - boxes[:, 1] < MIN_BOX_HEIGHT
    hidden = torch.tensor(
        [
            int((s.instances == k).sum()) < MIN_VISIBLE * s.drawn[k]
            for s in scenes
            for k in range(len(s.kinds))
            if bool((s.instances == k).any())
        ]
    )
    assert torch.equal(ignore, tiny | hidden)
    assert bool(tiny.any() and hidden.any() and (hidden & ~tiny).any())
    assert int(ignore.sum()) < len(ignore) // 4  # most objects are there to be found


def test_a_planted_object_cut_by_the_border_gets_the_part_inside() -> None:
    scene = _scene(3, Plant(VEHICLE, top=70, bottom=110, left=-20, right=40))
    boxes, labels = scene.target["boxes"], scene.target["labels"]
    planted = len(scene.kinds) - 1
    assert scene.kinds[planted] == "vehicle"
    assert boxes[-1].tolist() == [0.0, 70.0, 40.0, 110.0] and int(labels[-1]) == CAR
    assert not bool(scene.target["ignore"][-1])


def test_a_tiny_planted_sign_is_kept_and_ignored() -> None:
    scene = _scene(3, Plant(SIGN, top=10, bottom=15, left=100, right=106))
    assert scene.target["boxes"][-1].tolist() == [100.0, 10.0, 106.0, 15.0]
    assert int(scene.target["labels"][-1]) == SIGN_BOX and bool(scene.target["ignore"][-1])


def test_occluded_objects_keep_their_visible_part_and_hidden_ones_vanish() -> None:
    """A wall over the right part of the same scene (the plant draws no random number, so the
    scene is otherwise the same): each object keeps the box of its pixels left of the wall."""
    cut = 128
    clear = _scene(4)
    walled = _scene(4, Plant(BUILDING, top=0, bottom=H, left=cut, right=W))
    assert walled.kinds == clear.kinds  # a building plant is no object
    want, ignored = [], []
    for k in range(len(clear.kinds)):
        ys, xs = torch.nonzero(clear.instances[:, :cut] == k, as_tuple=True)
        if len(ys):
            want.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
            # still ignored when tiny, or when the wall left under a quarter of what was drawn
            ignored.append(
                bool(ys.max() + 1 - ys.min() < MIN_BOX_HEIGHT or len(ys) < MIN_VISIBLE * clear.drawn[k])
            )
    assert walled.target["boxes"].tolist() == want
    assert walled.target["ignore"].tolist() == ignored
    assert True in ignored  # the wall left some object mostly hidden
    assert len(want) < len(clear.target["boxes"])  # some object was hidden entirely
    assert any(b[2] == cut for b in want)  # and one cut by the wall


def test_same_seed_same_scenes_and_boxes_other_seed_differs() -> None:
    a = load_data("driving-scenes", task="detection", image_size=W, train_samples=3, val_samples=2, seed=1)
    b = load_data("driving-scenes", task="detection", image_size=W, train_samples=3, val_samples=2, seed=1)
    c = load_data("driving-scenes", task="detection", image_size=W, train_samples=3, val_samples=2, seed=2)
    assert isinstance(a.train, BoxTensorDataset) and isinstance(b.train, BoxTensorDataset)
    assert isinstance(c.train, BoxTensorDataset)
    assert torch.equal(a.train.images, b.train.images)
    for ta, tb in zip(a.train.labels, b.train.labels):
        assert all(torch.equal(ta[key], tb[key]) for key in ("boxes", "labels", "ignore"))
    assert not torch.equal(a.train.images, c.train.images)


def test_the_detection_bundle_batches_with_its_collate() -> None:
    bundle = load_data("driving-scenes", task="detection", train_samples=4, val_samples=2, seed=0)
    assert (bundle.task, bundle.input_hw, bundle.num_classes) == ("detection", (256, 512), 5)
    assert bundle.class_names == ("car", "pedestrian", "cyclist", "traffic_sign", "traffic_light")
    assert bundle.collate is collate_boxes and bundle.source is None
    images, targets = next(iter(DataLoader(bundle.train, batch_size=3, collate_fn=bundle.collate)))
    assert images.shape == (3, 3, 256, 512) and images.dtype == torch.float32
    assert float(images.max()) <= 1.0 and len(targets) == 3
    assert set(targets[0]) == {"boxes", "labels", "ignore"} and targets[0]["ignore"].dtype == torch.bool
    targets[0]["boxes"] += 1000  # items are copies: the dataset keeps its boxes
    assert float(bundle.train[0][1]["boxes"].max()) <= 512


def test_holdout_carves_detection_images_from_train() -> None:
    whole = load_data("driving-scenes", task="detection", image_size=64, train_samples=6, val_samples=1)
    held = load_data("driving-scenes", task="detection", image_size=64, train_samples=4, holdout=2)
    assert isinstance(whole.train, BoxTensorDataset) and isinstance(held.val, BoxTensorDataset)
    assert (len(held.train), len(held.val)) == (4, 2)
    assert torch.equal(held.val.images, whole.train.images[4:])
    assert torch.equal(held.val.labels[1]["boxes"], whole.train.labels[5]["boxes"])
    assert held.collate is collate_boxes


def test_segmentation_scenes_are_unchanged_by_the_detection_labels() -> None:
    """The digest of three scenes as the generator drew them before detection existed."""
    split = render_split(3, 128, 0, "train")
    digest = hashlib.sha256(split.images.numpy().tobytes() + split.labels.numpy().tobytes()).hexdigest()
    assert digest == "f605ad762d788755653405f2ba2c2dce259a76a9e873675032c9f561d64d239a"
    bundle = load_data("driving-scenes", train_samples=2, val_samples=1)
    assert (bundle.task, bundle.input_hw, bundle.collate) == ("segmentation", (128, 256), None)


@pytest.mark.parametrize(
    ("dataset", "task", "says"),
    [
        ("signs", "detection", "dataset signs has no labels for task detection (it has: classification)"),
        ("driving-scenes", "classification", "it has: segmentation, detection"),
    ],
)
def test_a_dataset_without_labels_for_the_task_says_which_it_has(dataset: str, task: str, says: str) -> None:
    with pytest.raises(UserError, match=re.escape(says)):
        load_data(dataset, task=task, train_samples=1, val_samples=1)
