"""Attacks on a tiny trained detector (detnet at width 0.5 trained for seconds on synthetic
32x64 scenes, see test_det_methods): TOG's goals move the detections the way they say, PGD on
the detection loss loses objects, its examples replay on ONNX Runtime with the same detections,
and Square lowers the task's margin seeing only outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporters.base import InputSpec
from exporters.onnx import export_onnx
from exporters.runtimes import build_runner
from tests.test_det_methods import CLASSES, H, W, _collate, _scenes
from toolchain.models import build_model
from toolchain.recipe import TrainConfig
from toolchain.robustness.attacks import build_attack
from toolchain.tasks import task_named
from toolchain.tasks.detection_ops import found, match, postprocess
from toolchain.training import make_loader, train_model

pytestmark = pytest.mark.usefixtures("one_thread")

DET = task_named("detection")


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "detnet",
        num_classes=CLASSES,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        width=0.5,
        task="detection",
    )
    cfg = TrainConfig(epochs=15, lr=0.05, loss="clean", weight_decay=0.0)
    train_model(
        model, make_loader(_scenes(64, seed=1), 8, shuffle=True, collate_fn=_collate), cfg, progress=False
    )
    return model.eval()


@pytest.fixture(scope="module")
def val() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    items = _scenes(16, seed=9)
    return torch.stack([x for x, _ in items]), [y for _, y in items]


def _confident(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return sum(len(d.confident().boxes) for d in postprocess(model(x)))


def _found(model: torch.nn.Module, x: torch.Tensor, ys: list[dict[str, torch.Tensor]]) -> int:
    with torch.no_grad():
        return sum(int(found(d, y).sum()) for d, y in zip(postprocess(model(x)), ys))


def _noise(x: torch.Tensor, eps: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)


def test_the_trained_detector_finds_most_objects(detector, val) -> None:  # type: ignore[no-untyped-def]
    x, ys = val
    assert _found(detector, x, ys) >= 0.6 * sum(len(y["boxes"]) for y in ys)


def test_tog_vanishing_and_fabrication_move_the_detections_beyond_random_noise(detector, val) -> None:  # type: ignore[no-untyped-def]
    x, ys = val
    eps = 8 / 255  # TOG's defaults: eps 8/255, step 2/255, 10 iterations
    clean, noisy = _confident(detector, x), _confident(detector, _noise(x, eps))
    vanished = _confident(
        detector, build_attack("tog-vanishing", eps=eps, task="detection")(detector, x, ys).x_adv
    )
    fabricated = _confident(
        detector, build_attack("tog-fabrication", eps=eps, task="detection")(detector, x, ys).x_adv
    )
    assert vanished < min(clean, noisy)
    assert fabricated > max(clean, noisy)


def test_tog_mislabeling_changes_the_labels_of_the_clean_detections(detector, val) -> None:  # type: ignore[no-untyped-def]
    x, ys = val
    x_adv = build_attack("tog-mislabeling", eps=8 / 255, task="detection")(detector, x, ys).x_adv
    with torch.no_grad():
        before, after = postprocess(detector(x)), postprocess(detector(x_adv))
    kept = sum(match(b.confident(), a.confident(), iou=0.5, score_atol=1.0)[0] for b, a in zip(before, after))
    kept_noise = 0
    with torch.no_grad():
        noisy = postprocess(detector(_noise(x, 8 / 255)))
    kept_noise = sum(
        match(b.confident(), n.confident(), iou=0.5, score_atol=1.0)[0] for b, n in zip(before, noisy)
    )
    assert kept < kept_noise  # fewer detections keep their class and place than under noise


def test_pgd_on_the_detection_loss_loses_objects_and_replays_on_onnxruntime(
    detector, val, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    x, ys = val
    x_adv = build_attack("pgd", eps=8 / 255, steps=10, step_size=2 / 255, task="detection")(
        detector, x, ys
    ).x_adv
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert _found(detector, x_adv, ys) < min(
        _found(detector, x, ys), _found(detector, _noise(x, 8 / 255), ys)
    )
    path = export_onnx(
        detector, tmp_path / "det.onnx", input_spec=InputSpec(3, H, W), output_names=DET.output_names(4)
    )
    engine = build_runner("onnxruntime", path=path)
    with torch.no_grad():
        agree, compared = DET.parity_agreement(detector(x_adv), engine(x_adv))  # type: ignore[misc]
    assert compared > 0 and agree == compared


def test_square_lowers_the_detection_margin_from_outputs_alone(detector, val, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, ys = val
    path = export_onnx(
        detector, tmp_path / "det.onnx", input_spec=InputSpec(3, H, W), output_names=DET.output_names(4)
    )
    engine = build_runner("onnxruntime", path=path)
    result = build_attack("square", eps=8 / 255, queries=100, task="detection")(engine, x, ys)
    assert result.queries is not None and int(result.queries.max()) <= 100
    with torch.no_grad():
        before = DET.objective.margin(detector(x), ys).sum()
        after = DET.objective.margin(detector(result.x_adv), ys).sum()
    assert after < before
