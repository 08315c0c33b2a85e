"""COCO scores worked by hand on tiny cases, and equal to pycocotools on random ones (crowd
regions included)."""

from __future__ import annotations

import pytest
import torch

from toolchain.tasks.det_metrics import coco_scores

NAMES = ["car", "person"]


def _t(
    boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None
) -> dict[str, torch.Tensor]:
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if ignore is not None:
        out["ignore"] = torch.tensor(ignore)
    return out


def _p(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {**_t(boxes, labels), "scores": torch.tensor(scores)}


def test_a_perfect_detection_scores_one_and_an_absent_class_has_no_ap() -> None:
    s = coco_scores([_p([[0, 0, 10, 10]], [0.9], [0])], [_t([[0, 0, 10, 10]], [0])], NAMES)
    assert s.map == s.map50 == s.map75 == 1.0
    assert s.per_class_ap == {"car": 1.0, "person": None}
    assert s.per_class_recall == {"car": 1.0, "person": None}
    assert s.images == 1


def test_a_box_at_iou_0_7_hits_five_of_the_ten_thresholds() -> None:
    # Ground truth 10x10, detection 10x7 inside it: IoU 0.7, a hit at 0.50 ... 0.70.
    s = coco_scores([_p([[0, 0, 10, 7]], [0.9], [0])], [_t([[0, 0, 10, 10]], [0])], NAMES)
    assert s.map == pytest.approx(0.5)
    assert (s.map50, s.map75) == (1.0, 0.0)
    assert s.per_class_recall["car"] == pytest.approx(0.5)


def test_a_false_positive_ranked_between_two_hits_costs_the_interpolated_precision() -> None:
    # Two cars; ranked: hit (0.9), miss (0.8), hit (0.7). Recall 0.5, 0.5, 1.0; precision 1, 1/2, 2/3.
    # The envelope gives 1.0 at the 51 recall points up to 0.50 and 2/3 at the 50 above.
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [_p([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    s = coco_scores(preds, targets, NAMES)
    assert s.map50 == pytest.approx((51 + 50 * 2 / 3) / 101)
    # Wrong class detections are false positives of their own class, not hits.
    wrong = coco_scores([_p([[0, 0, 10, 10]], [0.9], [1])], [_t([[0, 0, 10, 10]], [0])], NAMES)
    assert wrong.map == 0.0 and wrong.per_class_ap["person"] is None


def test_an_ignored_box_absorbs_detections_without_counting_as_an_object() -> None:
    targets = [_t([[0, 0, 10, 10], [40, 40, 44, 44]], [0, 0], ignore=[False, True])]
    # Two detections on the ignored (tiny) box, then the real one: neither hit nor miss.
    preds = [_p([[40, 40, 44, 44], [40, 40, 44, 44], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert coco_scores(preds, targets, NAMES).map == 1.0
    # Unflagged, the same tiny box is an object: the second detection on it is a false positive.
    plain = [_t([[0, 0, 10, 10], [40, 40, 44, 44]], [0, 0])]
    assert coco_scores(preds, plain, NAMES).map50 < 1.0
    # Only ignored objects: the class has no AP.
    only = coco_scores([_p([], [], [])], [_t([[40, 40, 44, 44]], [0], ignore=[True])], NAMES)
    assert only.per_class_ap["car"] is None and only.map == 0.0


def test_a_detection_is_matched_once_and_an_object_found_once() -> None:
    # Two detections on one car: one hit, one false positive after it (AP stays 1, precision
    # at full recall is reached before the duplicate). A missed second car halves recall.
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [_p([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    s = coco_scores(preds, targets, NAMES)
    assert s.per_class_recall["car"] == pytest.approx(0.5)
    assert s.map50 == pytest.approx(51 / 101)


def test_scores_equal_pycocotools_on_random_detections() -> None:
    pytest.importorskip("pycocotools", reason="pycocotools is an optional cross-check")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(0)
    images, anns, dets, preds, targets = [], [], [], [], []
    for i in range(40):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 80
        wh = torch.rand(n, 2, generator=g) * 30 + 8
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        jitter = torch.randn(n, 4, generator=g) * 4
        ignore = torch.rand(n, generator=g) < 0.15  # crowd regions
        keep = torch.rand(n, generator=g) > 0.2
        noise_xy = torch.rand(3, 2, generator=g) * 80
        pred_boxes = torch.cat([(boxes + jitter)[keep], torch.cat([noise_xy, noise_xy + 15], 1)])
        pred_boxes = torch.cat(
            [pred_boxes[:, :2].minimum(pred_boxes[:, 2:]), pred_boxes[:, :2].maximum(pred_boxes[:, 2:])], 1
        )
        pred_labels = torch.cat([labels[keep], torch.randint(0, 3, (3,), generator=g)])
        pred_scores = torch.rand(len(pred_boxes), generator=g)
        images.append({"id": i + 1, "width": 128, "height": 128})
        for b, c, crowd in zip(boxes.tolist(), labels.tolist(), ignore.tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
        for b, c, sc in zip(pred_boxes.tolist(), pred_labels.tolist(), pred_scores.tolist(), strict=True):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": sc,
                }
            )
        targets.append({"boxes": boxes, "labels": labels, "ignore": ignore})
        preds.append({"boxes": pred_boxes, "scores": pred_scores, "labels": pred_labels})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1} for k in range(3)]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    ours = coco_scores(preds, targets, ["a", "b", "c"])
    assert ours.map == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours.map50 == pytest.approx(ev.stats[1], abs=1e-6)
    assert ours.map75 == pytest.approx(ev.stats[2], abs=1e-6)


def test_int8_agreement_counts_confident_detections_found_in_the_other_file() -> None:
    from toolchain.tasks.detection import _found_in
    from toolchain.tasks.detection_ops import Detections

    def dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Detections:
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return Detections(b, torch.tensor(scores), torch.tensor(labels), b.clone())

    fp32 = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.8, 0.7], [0, 1, 0])
    # INT8 moved the first box (IoU 0.81: still found), flipped the second's class, lost the third.
    int8 = dets([[0, 0, 10, 9], [20, 20, 30, 30]], [0.85, 0.8], [0, 0])
    assert _found_in(fp32, int8) == 1 and _found_in(int8, fp32) == 1
    # One detection of theirs is found once, however many of mine overlap it.
    twice = dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])
    assert _found_in(twice, dets([[0, 0, 10, 10]], [0.9], [0])) == 1
