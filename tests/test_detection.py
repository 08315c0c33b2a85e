"""Object detection: post-processing and NMS, detection parity, assignment and loss against
hand-worked cases; the built-in detector's outputs, pruning (its pyramid levels and shared head
pruned consistently) and export; attacks on a tiny trained detector."""

from __future__ import annotations

import pytest
import torch

from toolchain.tasks import task_named
from toolchain.tasks.detection_loss import assign, centerness, detection_loss
from toolchain.tasks.detection_ops import (
    MAX_DETECTIONS,
    Detections,
    box_iou,
    found,
    match,
    postprocess,
    unpack,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DET = task_named("detection")


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def _outputs(scores: list[list[float]], boxes: list[list[float]]) -> tuple[torch.Tensor, ...]:
    """One image's raw outputs from per-prior class probabilities and boxes (priors = boxes)."""
    s = torch.tensor([[_logit(p) for p in row] for row in scores]).unsqueeze(0)
    b = torch.tensor(boxes).unsqueeze(0)
    return s, b, b.clone()


def _target(boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "ignore": torch.tensor(ignore if ignore is not None else [False] * len(labels), dtype=torch.bool),
    }


def test_postprocess_thresholds_and_suppresses_per_class() -> None:
    out = _outputs(
        scores=[[0.9, 0.01], [0.8, 0.01], [0.7, 0.6], [0.02, 0.03]],
        boxes=[[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 5, 5]],
    )
    (d,) = postprocess(out)
    # Prior 1 overlaps prior 0 (IoU 9/11 > 0.6) in class 0 and is suppressed; prior 2 gives one
    # detection per class (NMS is per class); prior 3 is under the 0.05 threshold.
    assert d.labels.tolist() == [0, 0, 1] and d.priors.tolist() == [0, 2, 2]
    assert torch.allclose(d.scores, torch.tensor([0.9, 0.7, 0.6]))
    assert d.boxes.tolist() == [[0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 60]]


def test_postprocess_keeps_at_most_the_best_detections_and_folds_quality_in() -> None:
    n = MAX_DETECTIONS + 20
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(n)]  # disjoint: NMS keeps all
    out = _outputs([[0.5 + i / (4 * n)] for i in range(n)], boxes)
    (d,) = postprocess(out)
    assert len(d.scores) == MAX_DETECTIONS and d.priors[0] == n - 1  # best first
    quality = torch.full((1, n, 1), _logit(0.25))
    (q,) = postprocess((*out, quality))
    assert torch.allclose(q.scores[0], (d.scores[0] * 0.25).sqrt())


def test_box_iou_and_found_against_hand_worked_boxes() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 1.0, 0.0]]))
    detections = Detections(
        boxes=torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50], [0, 0, 10, 12]]),
        scores=torch.tensor([0.9, 0.9, 0.2]),
        labels=torch.tensor([1, 0, 0]),
        priors=torch.tensor([0, 1, 2]),
    )
    target = _target(
        [[0, 0, 10, 10], [40, 40, 50, 50], [0, 0, 10, 10], [100, 100, 110, 110]],
        [1, 0, 0, 2],
        [False, False, False, True],
    )
    # Object 2 is only found by a detection under the operating score (0.2 < 0.3); object 3 is
    # ignored and left out.
    assert found(detections, target).tolist() == [True, True, False]


def test_detection_parity_matches_boxes_and_counts_threshold_ties() -> None:
    ref = Detections(
        boxes=torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        scores=torch.tensor([0.9, 0.0505]),
        labels=torch.tensor([0, 1]),
        priors=torch.tensor([0, 1]),
    )
    same = Detections(ref.boxes + 0.001, ref.scores + 1e-4, ref.labels, ref.priors)
    assert match(ref, same) == (4, 4, 0)  # two matched pairs, two units each
    # The second detection falls under the threshold on the other runtime: a tie, not a miss.
    dropped = Detections(ref.boxes[:1], ref.scores[:1], ref.labels[:1], ref.priors[:1])
    assert match(ref, dropped) == (3, 3, 1)
    # Moved by 3 px (IoU 7/13): no match; only the two near-threshold detections are ties.
    moved = Detections(ref.boxes + torch.tensor([[3.0, 0, 3, 0]]), ref.scores, ref.labels, ref.priors)
    assert match(ref, moved) == (2, 4, 2)
    relabelled = Detections(ref.boxes, ref.scores, torch.tensor([1, 1]), ref.priors)
    assert match(ref, relabelled) == (2, 4, 0)  # the second still matches, the first is a miss
    twin = Detections(
        torch.tensor([[0.0, 0, 10, 11], [20, 20, 30, 30]]),
        torch.tensor([0.9004, 0.0505]),
        ref.labels,
        ref.priors,
    )
    assert match(ref, twin) == (4, 4, 2)  # NMS kept the other of two near-equal boxes (IoU 10/11)


def test_assignment_takes_priors_inside_the_object_and_a_tiny_object_its_best_prior() -> None:
    # A 4x4 grid of 8x8 priors (one level), 32x32 image.
    centers = [(4 + 8 * i, 4 + 8 * j) for j in range(4) for i in range(4)]
    priors = torch.tensor([[x - 4, y - 4, x + 4, y + 4] for x, y in centers], dtype=torch.float32)
    owner = assign(priors, torch.tensor([[0.0, 0, 16, 16], [25.0, 25, 27, 27]]))
    positives = {i: int(o) for i, o in enumerate(owner) if o >= 0}
    assert {i for i, o in positives.items() if o == 0} <= {0, 1, 4, 5}  # centres inside object 0
    assert any(o == 0 for o in positives.values())
    assert [i for i, o in positives.items() if o == 1] == [15]  # the 2x2 object: nearest prior
    assert torch.allclose(
        centerness(torch.tensor([[5.0, 5.0], [2.0, 5.0]]), torch.tensor([[0.0, 0, 10, 10]] * 2)),
        torch.tensor([1.0, (2 / 8) ** 0.5]),
    )


def test_the_loss_has_no_box_term_without_objects_and_ignores_crowd_regions() -> None:
    scores = torch.full((1, 4, 2), -2.0, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]]])
    out = (scores, boxes, boxes.clone())
    empty = detection_loss(out, [_target([], [])])
    # Focal loss of every negative (alpha 0.25 weights negatives by 0.75), over one positive.
    p = torch.sigmoid(torch.tensor(-2.0))
    expected = 8 * 0.75 * float(-torch.log(1 - p) * p**2)
    assert float(empty.detach()) == pytest.approx(expected, rel=1e-5)
    crowd = detection_loss(out, [_target([[0, 0, 9, 9]], [0], [True])])
    assert float(crowd.detach()) == pytest.approx(
        expected * 6 / 8, rel=1e-5
    )  # prior 0's two classes drop out
    per_image = detection_loss(
        (scores.expand(2, -1, -1), boxes.expand(2, -1, -1), boxes.expand(2, -1, -1)),
        [_target([], [])] * 2,
        "none",
    )
    assert per_image.shape == (2,) and torch.allclose(per_image, empty.expand(2))


def test_detnet_returns_the_raw_heads_the_task_reads() -> None:
    from toolchain.models import build_model

    model = build_model(
        "detnet",
        num_classes=3,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        image_size=64,
        task="detection",
    )
    x = torch.rand(2, 3, 32, 64)
    heads = unpack(model.eval()(x))
    locations = 4 * 8 + 2 * 4 + 1 * 2  # strides 8, 16, 32 on 32x64
    assert heads.scores.shape == (2, locations, 3) and heads.quality is not None
    assert bool((heads.boxes[..., 2:] >= heads.boxes[..., :2]).all())
    assert float(heads.boxes.max()) <= 64 and float(heads.boxes.min()) >= 0
    assert torch.equal(heads.priors[0, 0], torch.tensor([4.0 - 16, 4 - 16, 4 + 16, 4 + 16]))
    DET.check_output(model(x), 3, x)
    with pytest.raises(Exception, match="one score per class"):
        DET.check_output(model(x), 4, x)


def test_the_end_to_end_file_detects_what_the_host_post_processing_does(tmp_path) -> None:
    from exporters.base import InputSpec
    from exporters.detection_graph import add_detection_postprocess
    from exporters.onnx import export_onnx
    from exporters.runtimes import build_runner
    from toolchain.models.detnet import detnet
    from toolchain.tasks.detection import in_graph_detections

    torch.manual_seed(0)
    model = detnet(num_classes=3, in_channels=3, width=0.25).eval()
    with torch.no_grad():  # class scores spread around the threshold, many overlapping boxes
        model.cls_pred.weight.normal_(0, 0.5)
        model.cls_pred.bias.fill_(-1.0)
    raw_path, e2e_path = tmp_path / "raw.onnx", tmp_path / "e2e.onnx"
    names = ["scores", "boxes", "priors", "quality"]
    export_onnx(model, raw_path, input_spec=InputSpec(3, 64, 96), output_names=names)
    add_detection_postprocess(raw_path, e2e_path)
    x = torch.rand(3, 3, 64, 96)
    raw = build_runner("onnxruntime", path=raw_path)(x)
    host = postprocess(raw)
    graph = in_graph_detections(build_runner("onnxruntime", path=e2e_path)(x), len(x))
    assert sum(len(d.boxes) for d in host) > 30  # the check has something to compare
    for h, g in zip(host, graph):
        # The host keeps the best 100 of an image, the graph 100 per class: the host's are the
        # graph's best, in the same order.
        top = slice(0, len(h.boxes))
        assert torch.equal(g.labels[top], h.labels)
        torch.testing.assert_close(g.scores[top], h.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(g.boxes[top], h.boxes, atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="expected a detector's raw outputs"):
        add_detection_postprocess(e2e_path, tmp_path / "again.onnx")


def test_torchvision_ssdlite_goes_out_as_raw_heads_with_a_dynamic_batch(tmp_path) -> None:
    """SSDlite's softmax-with-background logits become one logit per class whose sigmoid is SSD's
    probability, its anchors are the same for every image, and its ONNX file runs any batch size.
    (Failed before: the exported graph was fixed at batch 2, and the TorchScript fallback held an
    EyeLike node ONNX Runtime cannot run.)"""
    from exporters.base import InputSpec
    from exporters.onnx import export_onnx
    from exporters.runtimes import build_runner
    from toolchain.errors import UserError
    from toolchain.models import build_model
    from toolchain.models.tv_detection import independent_logits

    z = torch.randn(2, 5, 4)
    p = z.softmax(-1)
    torch.testing.assert_close(independent_logits(z).sigmoid(), p[..., 1:], atol=1e-6, rtol=0)

    stats = {"in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "task": "detection"}
    torch.manual_seed(0)
    model = build_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=3, image_size=128, **stats)
    model.eval()
    x = torch.rand(3, 3, 64, 128)
    heads = unpack(model(x))
    assert heads.scores.shape[-1] == 3 and heads.boxes.shape == heads.priors.shape
    assert torch.equal(heads.priors[0], heads.priors[2])
    path = export_onnx(
        model, tmp_path / "ssd.onnx", input_spec=InputSpec(3, 64, 128), output_names=["s", "b", "p"]
    )
    runner = build_runner("onnxruntime", path=path)
    for n in (1, 3):
        engine = runner(x[:n])
        with torch.no_grad():
            ours = model(x[:n])
        for a, b in zip(engine, ours, strict=True):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    with pytest.raises(UserError, match="two-stage detector"):
        build_model("torchvision:fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, image_size=128, **stats)
