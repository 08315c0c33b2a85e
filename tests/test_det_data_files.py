"""Detection datasets on disk: the KITTI and COCO layouts on small fake folders written here,
their class maps and resizing, the bad-annotation battery (one line naming the file and line or
annotation id, exit 2 from the CLI), and the stage keys seeing an edited label file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.cli import main
from toolchain.data import BoxTensorDataset, DataBundle, load_data
from toolchain.data.boxes import collate_boxes
from toolchain.errors import AnnotationError, DataNotFoundError
from toolchain.pipeline import stage_keys
from toolchain.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

# --- KITTI --------------------------------------------------------------------------------------

KITTI_W, KITTI_H = 100, 40
TAIL = "1.50 1.60 3.90 1.00 1.50 10.00 0.00"  # h w l x y z rotation_y: read, not used


def _kitti_line(kind: str, box: str) -> str:
    return f"{kind} 0.00 0 -1.50 {box} {TAIL}"


#: Frame 000000: every class rule (x scale 0.64 and y scale 0.8 at 64 x 32).
FRAME0 = [
    _kitti_line("Car", "10.00 5.00 60.00 35.00"),
    _kitti_line("Pedestrian", "70.00 10.00 80.00 30.00"),
    _kitti_line("Van", "5.00 5.00 25.00 25.00"),
    _kitti_line("DontCare", "80.00 0.00 100.00 8.00"),
    _kitti_line("Cyclist", "30.00 10.00 40.00 14.00"),  # 3.2 px high once resized: ignored
    "",
]


def _image(path: Path, width: int, height: int) -> None:
    """Left half red, right half blue, so a resize can be checked."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 200
    pixels[:, width // 2 :, 2] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def kitti(tmp_path: Path) -> Path:
    root = tmp_path / "kitti"
    for i in range(10):
        _image(root / "training" / "image_2" / f"{i:06d}.png", KITTI_W, KITTI_H)
        other = _kitti_line("Car", f"{i}.00 2.00 {i + 30}.00 38.00") + (" 0.97" if i % 2 else "")  # a score
        lines = FRAME0 if i == 0 else [other]
        label = root / "training" / "label_2" / f"{i:06d}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines))
    return root


def _kitti(root: Path, **kwargs: Any) -> DataBundle:
    return load_data("kitti", root=str(root), image_size=64, **kwargs)


def test_kitti_maps_classes_scales_boxes_and_resizes_images(kitti: Path) -> None:
    bundle = _kitti(kitti)
    assert (bundle.task, bundle.input_hw, bundle.collate) == ("detection", (32, 64), collate_boxes)
    assert bundle.class_names == ("car", "pedestrian", "cyclist", "traffic_sign", "traffic_light")
    assert bundle.source == str(kitti)
    image, target = bundle.train[0]
    assert image.shape == (3, 32, 64)
    assert float(image[0, 16, 8]) > 0.7 > float(image[2, 16, 8])  # the red half stayed left
    assert float(image[2, 16, 56]) > 0.7 > float(image[0, 16, 56])
    dontcare = [51.2, 0.0, 64.0, 6.4]
    want_boxes = [
        [6.4, 4.0, 38.4, 28.0],  # Car
        [44.8, 8.0, 51.2, 24.0],  # Pedestrian
        [3.2, 4.0, 16.0, 20.0],  # Van: car, ignored
        *[dontcare] * 5,  # DontCare: an ignored box for each class
        [19.2, 8.0, 25.6, 11.2],  # Cyclist, tiny
    ]
    assert torch.allclose(target["boxes"], torch.tensor(want_boxes), atol=1e-4)
    assert target["labels"].tolist() == [0, 1, 0, 0, 1, 2, 3, 4, 2]
    assert target["ignore"].tolist() == [False, False, True, True, True, True, True, True, True]


def test_kitti_split_is_the_last_tenth_or_the_imagesets_lists(kitti: Path) -> None:
    bundle = _kitti(kitti)
    assert isinstance(bundle.val, BoxTensorDataset)
    assert (len(bundle.train), len(bundle.val)) == (9, 1)
    assert torch.allclose(bundle.val[0][1]["boxes"], torch.tensor([[5.76, 1.6, 24.96, 30.4]]))  # frame 9
    sets = kitti / "ImageSets"
    sets.mkdir()
    (sets / "train.txt").write_text("000003\n000005\n")
    (sets / "val.txt").write_text("000000\n")
    listed = _kitti(kitti)
    assert (len(listed.train), len(listed.val)) == (2, 1)
    assert listed.val[0][1]["labels"].tolist() == [0, 1, 0, 0, 1, 2, 3, 4, 2]  # frame 0
    capped = _kitti(kitti.parent / "kitti", train_samples=1, seed=3)
    assert len(capped.train) == 1


def _fails_with(call: Any, message: str) -> str:
    with pytest.raises(AnnotationError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    assert text == message
    return text


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (
            _kitti_line("Car", "10.00 5.00 130.00 35.00"),
            "box 10.00 5.00 130.00 35.00 lies outside the 100x40 image; clip it to the image or remove it",
        ),
        (
            _kitti_line("Car", "60.00 5.00 10.00 35.00"),
            "box 60.00 5.00 10.00 35.00 has a negative width or height; "
            "write it as left, top, right, bottom with right >= left and bottom >= top",
        ),
        (
            _kitti_line("Bus", "10.00 5.00 60.00 35.00"),
            "unknown class 'Bus'; KITTI classes: Car, Van, Truck, Tram, Misc, Pedestrian, Person_sitting, "
            "Cyclist, DontCare; fix the name or remove the line",
        ),
        (
            "Car 0.00 0",
            "3 values, KITTI object labels have 15 "
            "(type truncated occluded alpha left top right bottom h w l x y z rotation_y); fix the line",
        ),
        (
            _kitti_line("Car", "10.00 five 60.00 35.00"),
            "box 10.00 five 60.00 35.00 is not four numbers; fix the line",
        ),
    ],
)
def test_a_bad_kitti_line_names_its_file_and_line(kitti: Path, line: str, says: str) -> None:
    label = kitti / "training" / "label_2" / "000004.txt"
    label.write_text(_kitti_line("Car", "1.00 1.00 20.00 20.00") + "\n" + line + "\n")
    _fails_with(lambda: _kitti(kitti), f"{label}:2: {says}")


def test_a_kitti_image_without_its_label_file_is_named(kitti: Path) -> None:
    label = kitti / "training" / "label_2" / "000007.txt"
    label.unlink()
    image = kitti / "training" / "image_2" / "000007.png"
    _fails_with(
        lambda: _kitti(kitti),
        f"{image} has no label file {label}; "
        "add it (an empty file for an image without objects) or remove the image",
    )


def test_a_kitti_label_file_that_is_not_text_is_named(kitti: Path) -> None:
    label = kitti / "training" / "label_2" / "000001.txt"
    label.write_bytes(b"Car \xff\xfe 0")
    text = _fails_with_prefix(lambda: _kitti(kitti), f"{label}: cannot read it as text (")
    assert text.endswith("; replace it with a KITTI label file")


def test_kitti_missing_folders_and_lists_say_the_layout(tmp_path: Path, kitti: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"image_2 is not a folder; expected root/training/image_2"):
        load_data("kitti", root=str(tmp_path / "nothing"))
    with pytest.raises(DataNotFoundError, match=r"needs data\.root"):
        load_data("kitti")
    (kitti / "ImageSets").mkdir()
    (kitti / "ImageSets" / "train.txt").write_text("000001\n000042\n")
    (kitti / "ImageSets" / "val.txt").write_text("000000\n")
    with pytest.raises(DataNotFoundError, match=r"train\.txt lists 000042 \(1 missing in all\) but"):
        _kitti(kitti)


# --- COCO ---------------------------------------------------------------------------------------

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"}]


def _coco_files(
    root: Path, split: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> Path:
    for image in images:
        _image(root / split / image["file_name"], image["width"], image["height"])
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}, indent=1)
    )
    return path


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    train_images = [
        {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "b.png", "width": 80, "height": 60},
    ]
    train_annotations = [
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [8, 6, 40, 30], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [50, 15, 20, 45], "iscrowd": 1},
    ]
    _coco_files(root, "train2017", train_images, train_annotations)
    val_images = [{"id": 5, "file_name": "c.png", "width": 40, "height": 40}]
    val_annotations = [{"id": 21, "image_id": 5, "category_id": 10, "bbox": [4, 0, 8, 20]}]
    _coco_files(root, "val2017", val_images, val_annotations)
    return root


def _coco(root: Path, **kwargs: Any) -> DataBundle:
    return load_data("coco", root=str(root), image_size=64, **kwargs)


def test_coco_maps_category_ids_to_contiguous_classes_and_crowds_to_ignore(coco: Path) -> None:
    bundle = _coco(coco)
    assert (bundle.task, bundle.input_hw, bundle.collate) == ("detection", (64, 64), collate_boxes)
    assert bundle.class_names == ("person", "car", "traffic light")  # ids 1, 3, 10
    assert (len(bundle.train), len(bundle.val), bundle.source) == (2, 1, str(coco))
    image, target = bundle.train[0]
    assert image.shape == (3, 64, 64) and float(image[0, 32, 8]) > 0.7 > float(image[0, 32, 56])
    sy = 64 / 60
    assert torch.allclose(
        target["boxes"], torch.tensor([[6.4, 6 * sy, 38.4, 36 * sy], [40.0, 15 * sy, 56.0, 64.0]])
    )
    assert target["labels"].tolist() == [1, 0] and target["ignore"].tolist() == [False, True]
    empty = bundle.train[1][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    val = bundle.val[0][1]
    assert torch.allclose(val["boxes"], torch.tensor([[6.4, 0.0, 19.2, 32.0]])) and val[
        "labels"
    ].tolist() == [2]


def _edit_train(root: Path, edit: Any) -> Path:
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))
    return path


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("bbox", [70, 6, 40, 30], "box [x, y, w, h] = [70, 6, 40, 30] lies outside the 80x60 image; "
         "clip it to the image or remove it"),
        ("bbox", [8, 6, -5, 30], "box [x, y, w, h] = [8, 6, -5, 30] has a negative width or height; "
         "write it as left, top, right, bottom with right >= left and bottom >= top"),
        ("bbox", [8, 6, 30], "bbox [8, 6, 30] is not [x, y, width, height]; fix it"),
        ("category_id", 7, "unknown category_id 7 (categories: 1, 3, 10); fix it or add it"),
        ("image_id", 99, "image_id 99 is not among the file's images; fix or remove it"),
    ],
)  # fmt: skip
def test_a_bad_coco_annotation_names_its_file_and_id(coco: Path, field: str, value: Any, says: str) -> None:
    path = _edit_train(coco, lambda data: data["annotations"][0].update({field: value}))
    _fails_with(lambda: _coco(coco), f"{path}: annotation id 11: {says}")


def test_unreadable_coco_json_names_the_line(coco: Path) -> None:
    path = coco / "annotations" / "instances_train2017.json"
    path.write_text(path.read_text()[:-40])
    text = _fails_with_prefix(lambda: _coco(coco), f"{path}:")
    assert "not valid JSON" in text and text.endswith("; fix or re-export the file")
    line = int(text[len(str(path)) + 1 :].split(":")[0])
    assert line == len(path.read_text().splitlines())  # the truncated end is where it breaks


def _fails_with_prefix(call: Any, prefix: str) -> str:
    with pytest.raises(AnnotationError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and text.startswith(prefix)
    return text


def test_coco_missing_image_wrong_size_and_differing_categories_are_named(coco: Path) -> None:
    (coco / "train2017" / "b.png").unlink()
    path = coco / "annotations" / "instances_train2017.json"
    _fails_with(
        lambda: _coco(coco),
        f"{path}: image id 2: {coco / 'train2017' / 'b.png'} does not exist; add it or remove the image",
    )
    _image(coco / "train2017" / "b.png", 60, 60)
    _fails_with(
        lambda: _coco(coco),
        f"{path}: image id 2 is listed as 80x60 but {coco / 'train2017' / 'b.png'} is 60x60; "
        "fix its width/height or the image",
    )
    _image(coco / "train2017" / "b.png", 80, 60)
    val = coco / "annotations" / "instances_val2017.json"
    data = json.loads(val.read_text())
    data["categories"] = [*data["categories"][:2], {"id": 10, "name": "traffic_light"}]
    val.write_text(json.dumps(data))
    _fails_with(
        lambda: _coco(coco),
        f"{val}: its categories differ from the training file's; use the same list in both",
    )


def test_coco_needs_one_annotation_file_per_split(tmp_path: Path, coco: Path) -> None:
    with pytest.raises(
        DataNotFoundError, match=r"need one annotations/instances_train\*\.json under .*, found none"
    ):
        load_data("coco", root=str(tmp_path))
    (coco / "annotations" / "instances_val2014.json").write_text("{}")
    with pytest.raises(
        DataNotFoundError,
        match=re.escape("found instances_val2014.json, instances_val2017.json; expected root/annotations"),
    ):
        _coco(coco)


# --- the CLI and the stage keys -----------------------------------------------------------------


def _recipe(root: Path, dataset: str) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "det-data",
        "task": "detection",
        "data": {
            "dataset": dataset,
            "root": str(root),
            "image_size": 64,
            "train_samples": 4,
            "val_samples": 1,
        },
        "model": {"arch": "detnet"},
    }


def test_the_cli_answers_a_bad_label_file_with_one_line_and_exit_2(
    kitti: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    label = kitti / "training" / "label_2" / "000006.txt"  # read whichever images the caps keep
    label.write_text(_kitti_line("Bus", "1.00 1.00 20.00 20.00") + "\n")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(kitti, "kitti")))
    code = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"robustprune: error: {label}:1: unknown class 'Bus'") and "\n" not in err


@pytest.mark.parametrize("dataset", ["kitti", "coco"])
def test_an_edited_label_file_changes_the_stage_keys(kitti: Path, coco: Path, dataset: str) -> None:
    root = {"kitti": kitti, "coco": coco}[dataset]
    recipe = recipe_from_dict(_recipe(root, dataset))
    before = stage_keys(recipe)
    assert stage_keys(recipe) == before
    if dataset == "kitti":
        label = kitti / "training" / "label_2" / "000002.txt"
        label.write_text(label.read_text() + "\n" + _kitti_line("Pedestrian", "1.00 1.00 9.00 30.00"))
    else:
        _edit_train(coco, lambda data: data["annotations"][0].update({"bbox": [8, 6, 41, 30]}))
    after = stage_keys(recipe)
    assert after["train"] != before["train"]
    assert all(after[name] != before[name] for name in before)
