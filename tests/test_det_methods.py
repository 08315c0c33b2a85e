"""Every pruning method on a detector: the built-in detnet, pruned to 2x fewer MACs by each
method with its training shortened to one tiny epoch, keeps its heads' outputs (every class,
four box coordinates per location), and its ONNX file agrees with PyTorch on detections.

The images are synthetic (a bright rectangle per object on a dark background, 32x64) so the
test needs no dataset and runs in seconds per method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporters.base import InputSpec
from exporters.onnx import check_parity, export_onnx
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain.models import build_model
from toolchain.preflight import budget_of
from toolchain.pruning import classifier_layers, prune_model
from toolchain.pruning.methods import METHODS, PruneJob
from toolchain.recipe import recipe_from_dict
from toolchain.tasks import task_named
from toolchain.training import make_loader

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, CLASSES = 32, 64, 3
_ONE = {"epochs": 1, "lr": 0.01, "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}}
_PROBE = {"probe_batches": 1, "probe_attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}}
SECTIONS = {
    "iterative": {"criterion": "adv-taylor", "steps": 2, "attack": _ONE["attack"]},
    "hydra": {"hydra": {"train": {**_ONE, "loss": "trades"}}},
    "bap": {"bap": {"train": {**_ONE, "loss": "hybrid"}, "update_every": 1, "deepfool_steps": 2}},
    "dnr": {"dnr": {"train": {**_ONE, "loss": "hybrid"}}},
    "gated": {"gated": {"train": {**_ONE, "loss": "mixed"}}},
    "mrs": {"mrs": _PROBE},
    "lowrank": {"lowrank": _PROBE},
}


def _scenes(n: int, seed: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        x = torch.rand(3, H, W, generator=g) * 0.2
        boxes, labels = [], []
        for j in range(2):
            x0, y0 = (
                int(torch.randint(0, W - 20, (1,), generator=g)),
                int(torch.randint(0, H - 14, (1,), generator=g)),
            )
            w, h = int(torch.randint(8, 20, (1,), generator=g)), int(torch.randint(8, 14, (1,), generator=g))
            label = (i + j) % CLASSES
            x[label, y0 : y0 + h, x0 : x0 + w] = 0.9
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels),
            "ignore": torch.zeros(len(labels), dtype=torch.bool),
        }
        items.append((x, target))
    return items


def _collate(batch):  # type: ignore[no-untyped-def]
    return torch.stack([x for x, _ in batch]), [y for _, y in batch]


def test_every_method_is_exercised_here() -> None:
    assert set(METHODS.names()) == set(SECTIONS)


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_every_method_prunes_a_detector_to_target_and_its_onnx_file_agrees(
    method: str, tmp_path: Path
) -> None:
    data = _scenes(8, seed=1)
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
    prune = {"target": {"macs_reduction": 2}, **SECTIONS[method]}
    if method != "iterative":
        prune["method"] = method
    recipe = recipe_from_dict({"task": "detection", "prune": prune})
    example = torch.zeros(1, 3, H, W)
    job = PruneJob(
        example,
        budget_of(recipe.prune),
        classifier_layers(model, example),
        loader=lambda offset: make_loader(data, 4, shuffle=True, seed=offset, collate_fn=_collate),
        progress=False,
    )
    result = prune_model(model, job, recipe.prune)
    assert result.target_met and result.macs_reduction >= 1.9  # met within the tolerance
    pruned = result.model.eval()
    scores, boxes, priors, quality = pruned(torch.rand(2, 3, H, W))
    locations = 4 * 8 + 2 * 4 + 1 * 2
    assert scores.shape == (2, locations, CLASSES) and boxes.shape == priors.shape == (2, locations, 4)
    assert quality.shape == (2, locations, 1)
    # The FPN's levels share the head: its channels are pruned alike for every level, so the
    # exported file runs and agrees with PyTorch on detections.
    with torch.no_grad():  # detections to compare: class scores above the threshold
        pruned.net.cls_pred.bias.fill_(0.0)
    spec = InputSpec(3, H, W)
    path = export_onnx(
        pruned,
        tmp_path / "pruned.onnx",
        output_names=["scores", "boxes", "priors", "quality"],
        input_spec=spec,
    )
    task = task_named("detection")
    images = [torch.stack([x for x, _ in data[:4]]), torch.stack([x for x, _ in data[4:]])]
    parity = check_parity(
        TorchRunner(pruned, spec),
        build_runner("onnxruntime", path=path),
        iter(images),
        agreement=task.parity_agreement,
    )
    assert parity.max_abs_diff < 1e-3 and parity.top1_agreement == 1.0
