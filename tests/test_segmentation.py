"""Segmentation as a task: the dataset's labels, the loss and metrics, SegPGD, the segnet model
pruned and exported with parity, the suite (PGD monotone in eps, ONNX Runtime transfer equal to
PyTorch white-box) and the recipe checks. Tiny sizes: 64x32 scenes, segnet at width 0.5."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from exporters.base import InputSpec
from exporters.onnx import check_parity, export_onnx
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain.data import load_data
from toolchain.data.driving_scenes import (
    CLASS_NAMES,
    COLORS,
    IGNORE,
    PEDESTRIAN,
    VEHICLE,
    Plant,
    render_scene,
)
from toolchain.errors import UserError
from toolchain.models import build_model
from toolchain.preflight import budget_of, check
from toolchain.pruning import classifier_layers, count_macs_params, prune_model
from toolchain.pruning.methods import PruneJob
from toolchain.recipe import EvalAttackConfig, TrainConfig, ValidateConfig, recipe_from_dict
from toolchain.report.gates import resolve_metric
from toolchain.report.html import render_html
from toolchain.report.markdown import render_markdown
from toolchain.report.schema import Corruptions, Evaluation, Report
from toolchain.robustness.attacks.segpgd import segpgd_attack, segpgd_weights
from toolchain.robustness.corruptions.metrics import add_corruption_errors
from toolchain.robustness.suite import evaluate
from toolchain.tasks import task_named, task_of
from toolchain.tasks.seg_metrics import class_iou, confusion, mean_iou, pixel_accuracy
from toolchain.training import make_loader, train_model

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64  # scenes are 64 x 32
SEG = task_named("segmentation")


@pytest.fixture(scope="module")
def scenes():  # type: ignore[no-untyped-def]
    return load_data("driving-scenes", image_size=WIDTH, train_samples=24, val_samples=8, seed=3)


@pytest.fixture(scope="module")
def trained(scenes):  # type: ignore[no-untyped-def]
    """A segnet trained clean for a few epochs: far from chance, so attacks have pixels to flip."""
    torch.manual_seed(0)
    model = build_model(
        "segnet",
        num_classes=9,
        in_channels=3,
        mean=scenes.mean,
        std=scenes.std,
        width=0.5,
        task="segmentation",
    )
    cfg = TrainConfig(epochs=6, lr=0.1, loss="clean", weight_decay=0.0)
    train_model(model, make_loader(scenes.train, 8, shuffle=True), cfg, progress=False)
    return model.eval()


def _val(scenes) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x, y = zip(*(scenes.val[i] for i in range(len(scenes.val))))
    return torch.stack(x), torch.stack(y)


# --- data -------------------------------------------------------------------------------------


def test_driving_scenes_are_seeded_per_pixel_labelled_and_wide(scenes) -> None:  # type: ignore[no-untyped-def]
    again = load_data("driving-scenes", image_size=WIDTH, train_samples=24, val_samples=8, seed=3)
    other = load_data("driving-scenes", image_size=WIDTH, train_samples=24, val_samples=8, seed=4)
    assert torch.equal(scenes.train.images, again.train.images)
    assert torch.equal(scenes.val.labels, again.val.labels)
    assert not torch.equal(scenes.train.images, other.train.images)
    assert scenes.task == "segmentation" and scenes.input_hw == (32, 64) and scenes.num_classes == 9
    x, y = scenes.train[0]
    assert x.shape == (3, 32, 64) and y.shape == (32, 64) and y.dtype == torch.int64
    labels = set(torch.unique(scenes.train.labels).tolist())
    assert labels <= {*range(len(CLASS_NAMES)), IGNORE}
    assert {0, 3, 4} <= labels  # road, sky and vegetation are in every scene


@pytest.mark.parametrize("cls", [VEHICLE, PEDESTRIAN])
def test_a_planted_object_carries_its_class_and_colour(cls: int) -> None:
    g = torch.Generator().manual_seed(0)
    image, label = render_scene(64, 128, g, plant=Plant(cls, top=40, bottom=52, left=30, right=50))
    assert bool((label[40:52, 30:50] == cls).all())
    outside = torch.ones_like(label, dtype=torch.bool)
    outside[40:52, 30:50] = False
    assert int((label[outside] == cls).sum()) < outside.sum()  # the rest of the scene is drawn too
    # The object's pixels have its colour, up to the scene's lighting (one factor per channel).
    patch = image[:, 40:52, 30:50].float().mean((1, 2))
    ratio = patch / (torch.tensor(COLORS[cls]) * 255)
    assert float(ratio.max() - ratio.min()) < 0.25 * float(ratio.mean())


# --- task, loss, metrics ----------------------------------------------------------------------


def test_segmentation_loss_ignores_unlabelled_pixels_and_metrics_match_hand_counts() -> None:
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[0, 1, 0, 2] = 5.0  # predicts 0, 1, 1, 0
    y = torch.tensor([[[0, 1, 2, IGNORE]]])
    full = torch.nn.functional.cross_entropy(logits[..., :3], y[..., :3])
    assert torch.allclose(SEG.loss(logits, y), full)
    assert torch.allclose(SEG.loss(logits, y, reduction="none"), full.view(1))
    assert SEG.hits(logits, y) == (2, 3)
    m = confusion(logits.argmax(1), y, 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert class_iou(m) == [1.0, 0.5, 0.0] and mean_iou(m) == pytest.approx(0.5)
    assert pixel_accuracy(m) == pytest.approx(2 / 3)


def test_segpgd_weights_move_from_correct_pixels_to_an_even_split() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # predicts class 0, then 1
    y = torch.tensor([[[0, 0]]])  # first pixel right, second wrong
    assert segpgd_weights(logits, y, 0, 10).flatten().tolist() == [1.0, 0.0]
    assert segpgd_weights(logits, y, 5, 10).flatten().tolist() == [0.75, 0.25]
    assert segpgd_weights(logits, torch.tensor([[[0, IGNORE]]]), 5, 10).flatten().tolist() == [0.75, 0.0]


# --- model, pruning, export -------------------------------------------------------------------


def test_segnet_prunes_to_the_target_and_exports_with_per_pixel_parity(scenes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(
        "segnet",
        num_classes=9,
        in_channels=3,
        mean=scenes.mean,
        std=scenes.std,
        width=0.5,
        task="segmentation",
    )
    assert task_of(model) is SEG
    example = torch.zeros(1, 3, 32, 64)
    assert model(example).shape == (1, 9, 32, 64)
    head = classifier_layers(model, example)
    assert head == [model.net.classifier]
    recipe = recipe_from_dict(
        {
            "prune": {
                "criterion": "adv-taylor",
                "steps": 2,
                "importance_batches": 1,
                "target": {"macs_reduction": 3},
            }
        }
    )
    job = PruneJob(
        example_inputs=example,
        budget=budget_of(recipe.prune),
        ignored_layers=head,
        loader=lambda offset: make_loader(scenes.train, 8, shuffle=True, seed=offset),
        progress=False,
    )
    before = model.net.dec2[0].in_channels
    result = prune_model(
        model, job, recipe.prune.model_copy(update={"finetune_between": TrainConfig(epochs=0)})
    )
    assert result.target_met and result.macs_reduction == pytest.approx(3.0, rel=0.05)
    pruned = result.model.eval()
    assert pruned.net.classifier.out_channels == 9  # the head keeps every class
    assert pruned.net.dec2[0].in_channels < before  # the skip concatenation was pruned with its sources
    macs, _ = count_macs_params(pruned, example)
    assert macs == result.macs
    spec = InputSpec(3, 32, 64)
    path = export_onnx(
        pruned, tmp_path / "pruned.onnx", input_spec=spec, metadata={"class_names": list(CLASS_NAMES)}
    )
    x, _ = _val(scenes)
    parity = check_parity(TorchRunner(pruned, spec), build_runner("onnxruntime", path=path, threads=1), [x])
    assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-4 and parity.samples == 8


# --- suite ------------------------------------------------------------------------------------


def _validate(attacks: list[EvalAttackConfig], corruptions: list[str] | None = None) -> ValidateConfig:
    return ValidateConfig(
        samples=8,
        batch_size=8,
        attacks=attacks,
        corruptions={"names": corruptions or [], "severities": [2]},  # type: ignore[arg-type]
    )


def test_pgd_lowers_miou_monotonically_with_eps(scenes, trained) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    spec = InputSpec(3, 32, 64)
    epsilons = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
    cfg = _validate([EvalAttackConfig(name="pgd", eps=e, steps=5) for e in epsilons])
    (ev,) = evaluate(
        trained,
        {"torch": TorchRunner(trained, spec)},
        [(x, y)],
        cfg,
        model_name="dense",
        class_names=CLASS_NAMES,
    )
    assert ev.miou is not None and ev.miou > 0.25  # well above chance: there is something to attack
    mious = [ev.miou] + [a.miou for a in ev.attacks]
    assert all(later < earlier for earlier, later in itertools.pairwise(mious)), mious
    assert [a.mode for a in ev.attacks] == ["white-box"] * 4 and ev.robust_miou is not None
    assert [r.miou for r in ev.robust_miou] == mious[1:]
    assert [a.clean_miou for a in ev.attacks] == [ev.miou] * 4  # every attack saw every image


def test_onnxruntime_transfer_equals_pytorch_white_box_in_fp32(scenes, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    spec = InputSpec(3, 32, 64)
    path = export_onnx(trained, tmp_path / "dense.onnx", input_spec=spec)
    runners = {
        "torch": TorchRunner(trained, spec),
        "onnxruntime": build_runner("onnxruntime", path=path, threads=1),
    }
    attacks = [
        EvalAttackConfig(name="pgd", eps=4 / 255, steps=5),
        EvalAttackConfig(name="segpgd", eps=4 / 255, steps=5),
    ]
    torch_ev, ort_ev = evaluate(
        trained, runners, [(x, y)], _validate(attacks, ["fog"]), model_name="dense", class_names=CLASS_NAMES
    )
    assert [a.mode for a in ort_ev.attacks] == ["transfer", "transfer"]
    assert [a.miou for a in ort_ev.attacks] == [a.miou for a in torch_ev.attacks]
    assert [a.accuracy for a in ort_ev.attacks] == [a.accuracy for a in torch_ev.attacks]
    assert ort_ev.miou == torch_ev.miou and ort_ev.per_class_iou == torch_ev.per_class_iou
    assert (
        ort_ev.parity is not None
        and ort_ev.parity.top1_agreement == 1.0
        and ort_ev.parity.compared == 8 * 32 * 64
    )
    assert ort_ev.corruptions.per_corruption_miou == torch_ev.corruptions.per_corruption_miou
    assert all(a.miou is not None and a.miou < torch_ev.miou for a in torch_ev.attacks)  # type: ignore[operator]
    assert ort_ev.flags == [] and ort_ev.nonfinite_logits == 0


def test_an_attack_on_the_first_images_reports_their_clean_miou(scenes, trained) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    cfg = _validate([EvalAttackConfig(name="pgd", eps=4 / 255, steps=2, samples=3)])
    (ev,) = evaluate(
        trained,
        {"torch": TorchRunner(trained, InputSpec(3, 32, 64))},
        [(x[:5], y[:5]), (x[5:], y[5:])],
        cfg,
        model_name="dense",
        class_names=CLASS_NAMES,
    )
    (attack,) = ev.attacks
    with torch.no_grad():
        first = mean_iou(confusion(trained(x[:3]).argmax(1), y[:3], 9))
    assert attack.samples == 3 and attack.clean_miou == pytest.approx(first) and attack.clean_miou != ev.miou


def test_segpgd_stays_in_the_ball_and_lowers_miou(scenes, trained) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    x_adv = segpgd_attack(trained, x, y, eps=4 / 255, step_size=1 / 255, steps=5, generator=torch.Generator())
    assert (
        float((x_adv - x).abs().max()) <= 4 / 255 + 1e-6
        and float(x_adv.min()) >= 0
        and float(x_adv.max()) <= 1
    )
    with torch.no_grad():
        clean, adv = (mean_iou(confusion(trained(v).argmax(1), y, 9)) for v in (x, x_adv))
    assert adv < clean - 0.05


# --- report -------------------------------------------------------------------------------------


def _seg_eval(model: str, miou: float, fog: float) -> Evaluation:
    return Evaluation(
        model=model,
        runtime="onnxruntime",
        task="segmentation",
        clean_accuracy=0.9,
        miou=miou,
        pixel_accuracy=0.9,
        per_class_iou={"road": miou},
        corruptions=Corruptions(
            per_corruption={"fog": {"1": 0.8}},
            mean_accuracy=0.8,
            per_corruption_miou={"fog": {"1": fog}},
            mean_miou=fog,
        ),
        nonfinite_logits=0,
    )


def test_corruption_errors_are_on_miou_and_reports_show_segmentation_keys() -> None:
    dense, pruned = _seg_eval("dense", 0.8, 0.6), _seg_eval("pruned", 0.7, 0.4)
    add_corruption_errors([dense, pruned])
    # CE = (1 - 0.4) / (1 - 0.6); relative CE = (0.6 - 0.3) / (0.4 - 0.2): on mIoU, not pixel accuracy.
    assert pruned.corruptions.mce == pytest.approx(1.5) and pruned.corruptions.relative_mce == pytest.approx(
        1.5
    )
    report = Report(name="seg", evaluations=[dense, pruned])
    data = report.to_json()
    assert resolve_metric(data, "evaluations[model=pruned,runtime=onnxruntime].miou") == pytest.approx(0.7)
    assert resolve_metric(data, "evaluations[model=pruned].corruptions.per_corruption_miou.fog.1") == 0.4
    assert resolve_metric(data, "evaluations[model=pruned].per_class_iou.road") == pytest.approx(0.7)
    assert "mIoU 70.0% (pixel acc. 90.0%)" in render_markdown(report, [])
    assert "clean mIoU" in render_html(report, [])
    from toolchain.report.compare import comparison_rows

    rows = {row[0]: row for row in comparison_rows(report, report)}
    assert rows["pruned/onnxruntime/fp32 clean mIoU"][1] == "70.0%"
    assert "miou" not in Evaluation(model="dense", runtime="torch").to_json()  # classification keys unchanged


# --- recipe checks --------------------------------------------------------------------------------

TINY = {
    "task": "segmentation",
    "device": "cpu",
    "data": {"dataset": "driving-scenes", "image_size": 32, "train_samples": 2, "val_samples": 2},
    "model": {"arch": "segnet", "width": 0.25},
    "validate": {"attacks": [{"name": "segpgd"}]},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"task": "classification", "validate": {"attacks": [{"name": "pgd"}]}},
            "dataset driving-scenes has no labels for task classification",
        ),
        ({"model": {"arch": "resnet20"}}, r"segmentation needs \(N, num_classes, H, W\)"),
        ({"validate": {"attacks": [{"name": "square"}]}}, "not a segmentation attack"),
        ({"task": "detection"}, "'segpgd' is not a detection attack"),
    ],
)
def test_recipe_settings_a_segmentation_run_cannot_use_are_refused(change: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(UserError, match=message):
        check(recipe_from_dict({**TINY, **change}))


def test_a_valid_segmentation_recipe_passes_preflight() -> None:
    data = check(recipe_from_dict(TINY))
    assert data.task == "segmentation" and data.input_hw == (16, 32)


# --- the pipeline end to end ----------------------------------------------------------------------

TINY_RUN = {
    **TINY,
    "name": "seg-tiny",
    "data": {
        "dataset": "driving-scenes",
        "image_size": 48,
        "train_samples": 16,
        "val_samples": 4,
        "batch_size": 8,
    },
    "train": {"epochs": 1, "loss": "pgd", "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}},
    "prune": {
        "steps": 1,
        "importance_batches": 1,
        "target": {"macs_reduction": 2.0},
        "finetune_between": {"epochs": 0},
        "bn_recalibration_batches": 1,
    },
    "finetune": {"epochs": 1, "loss": "hybrid", "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}},
    "export": {"parity_samples": 4},
    "validate": {
        "samples": 4,
        "batch_size": 4,
        "attacks": [
            {"name": "pgd", "eps": "2/255", "steps": 2},
            {"name": "segpgd", "eps": "2/255", "steps": 2},
        ],
        "corruptions": {"names": ["fog"], "severities": [1, 3]},
    },
    "bench": {"warmup": 1, "iterations": 2},
    "gates": [
        {
            "metric": "evaluations[model=pruned,runtime=onnxruntime].robust_miou[norm=linf].miou",
            "threshold": 0.0,
        }
    ],
}


@pytest.mark.e2e
def test_a_segmentation_run_reports_miou_passes_its_gates_and_its_engine_validates(tmp_path: Path) -> None:
    from toolchain.pipeline import run_pipeline
    from toolchain.validate_engine import validate_engine

    recipe = recipe_from_dict(TINY_RUN)
    report = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert report.passed, [g for g in report.intrinsic_gates if not g.passed]
    assert report.models.pruned is not None and report.models.pruned.target_met
    evs = {(e.model, e.runtime): e for e in report.evaluations}
    assert set(evs) == {(m, r) for m in ("dense", "pruned") for r in ("torch", "onnxruntime")}
    ort = evs[("pruned", "onnxruntime")]
    assert (
        ort.task == "segmentation"
        and ort.per_class_iou is not None
        and set(ort.per_class_iou) == set(CLASS_NAMES)
    )
    assert [a.name for a in ort.attacks] == ["pgd", "segpgd"] and ort.corruptions.mce is not None
    assert ort.miou == evs[("pruned", "torch")].miou  # FP32 engine, same pixels
    assert report.parity is not None and report.parity["pruned"].top1_agreement == 1.0
    engine = validate_engine(
        tmp_path / "run" / "export" / "pruned.onnx", recipe, tmp_path / "engine", progress=False
    )
    (row,) = engine.evaluations
    assert row.miou == ort.miou and [a.mode for a in row.attacks] == ["transfer", "transfer"]


# --- Cityscapes-layout folders --------------------------------------------------------------------


def _write_city(root: Path, split: str, name: str, label_ids: list[int]) -> None:
    """A 64 x 32 image and its labelIds: one vertical band of 16 columns per id."""
    from PIL import Image

    ids = torch.tensor(label_ids, dtype=torch.uint8).repeat_interleave(64 // len(label_ids)).expand(32, 64)
    pixels = (ids.unsqueeze(-1) * 7).expand(32, 64, 3).contiguous()
    for folder, suffix, array in (
        ("leftImg8bit", "_leftImg8bit.png", pixels),
        ("gtFine", "_gtFine_labelIds.png", ids.contiguous()),
    ):
        path = root / folder / split / "aachen" / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.numpy()).save(path)


def test_a_cityscapes_folder_loads_with_train_ids_and_ignore(tmp_path: Path) -> None:
    _write_city(tmp_path, "train", "aachen_000000_000019", [7, 26, 0, 33])  # road, car, unlabeled, bicycle
    _write_city(tmp_path, "train", "aachen_000001_000019", [23, 24, 8, 11])  # sky, person, sidewalk, building
    _write_city(
        tmp_path, "val", "aachen_000002_000019", [21, 1, 20, 17]
    )  # vegetation, ego vehicle, sign, pole
    data = load_data("cityscapes", root=str(tmp_path), image_size=32, seed=0)
    assert data.task == "segmentation" and data.num_classes == 19 and data.input_hw == (16, 32)
    assert data.class_names[:2] == ("road", "sidewalk") and data.class_names[-1] == "bicycle"
    rows = {tuple(data.train.labels[i, 0, ::8].tolist()) for i in range(2)}
    assert rows == {(0, 13, 255, 18), (10, 11, 1, 2)}  # nearest-neighbour resize keeps the ids
    assert data.val.labels[0, 0, ::8].tolist() == [8, 255, 7, 5]
    assert data.val[0][0].shape == (3, 16, 32)
    with pytest.raises(UserError, match="has no label file"):
        (tmp_path / "gtFine" / "val" / "aachen" / "aachen_000002_000019_gtFine_labelIds.png").unlink()
        load_data("cityscapes", root=str(tmp_path), image_size=32)


# --- torchvision segmentation models ----------------------------------------------------------------


@pytest.mark.parametrize(
    "arch", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
)
def test_torchvision_segmentation_models_prune_to_target_keeping_their_heads(
    arch: str, scenes, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(
        f"torchvision:{arch}",
        num_classes=9,
        in_channels=3,
        mean=scenes.mean,
        std=scenes.std,
        task="segmentation",
    ).eval()
    assert getattr(model.net.model, "aux_classifier", None) is None  # no auxiliary head, no download
    example = torch.zeros(1, 3, 32, 64)
    head = classifier_layers(model, example)
    assert head and all(h.out_channels == 9 for h in head)  # LR-ASPP has two, summed
    recipe = recipe_from_dict(
        {"prune": {"criterion": "magnitude", "steps": 1, "target": {"macs_reduction": 2}}}
    )
    job = PruneJob(example, budget_of(recipe.prune), head, loader=lambda _: [], progress=False)
    result = prune_model(
        model, job, recipe.prune.model_copy(update={"finetune_between": TrainConfig(epochs=0)})
    )
    assert result.target_met and all(h.out_channels == 9 for h in head)
    pruned = result.model.eval()
    assert pruned(example).shape == (1, 9, 32, 64)
    if arch != "lraspp_mobilenet_v3_large":
        return  # exporting the others costs ~8 s each: bench/bench_segmentation.py checks their parity
    spec = InputSpec(3, 32, 64)
    path = export_onnx(pruned, tmp_path / "lraspp.onnx", input_spec=spec)
    x, _ = _val(scenes)
    parity = check_parity(TorchRunner(pruned, spec), build_runner("onnxruntime", path=path, threads=1), [x])
    assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-4


# --- every method the task allows ---------------------------------------------------------------

_STEP = {"epochs": 1, "loss": "pgd", "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1}}


@pytest.mark.parametrize(
    ("method", "section"),
    [
        ("hydra", {"train": _STEP}),
        ("dnr", {"train": _STEP, "update_every": 1}),
        ("mrs", {"probe_batches": 1}),
        ("lowrank", {"probe_batches": 1}),
    ],
)
def test_training_and_probing_methods_prune_segnet_to_target(method: str, section: dict, scenes) -> None:  # type: ignore[no-untyped-def,type-arg]
    torch.manual_seed(0)
    model = build_model(
        "segnet",
        num_classes=9,
        in_channels=3,
        mean=scenes.mean,
        std=scenes.std,
        width=0.5,
        task="segmentation",
    )
    example = torch.zeros(1, 3, 32, 64)
    recipe = recipe_from_dict({"prune": {"method": method, "target": {"macs_reduction": 2}, method: section}})
    job = PruneJob(
        example,
        budget_of(recipe.prune),
        classifier_layers(model, example),
        loader=lambda offset: make_loader(scenes.train, 8, shuffle=True, seed=offset),
        progress=False,
    )
    result = prune_model(model, job, recipe.prune)
    assert result.target_met and result.model.net.classifier.out_channels == 9
    assert result.model.eval()(example).shape == (1, 9, 32, 64)


def test_the_spec_records_the_task_and_old_specs_classify() -> None:
    from toolchain.models import build_from_spec

    model = build_model("segnet", num_classes=9, in_channels=1, mean=[0.5], std=[0.2], task="segmentation")
    assert model.spec["task"] == "segmentation"
    assert task_of(build_from_spec(dict(model.spec))) is SEG
    old = {k: v for k, v in model.spec.items() if k != "task"}
    assert task_of(build_from_spec(old)).name == "classification"
    with pytest.raises(UserError, match="unknown task 'tracking'"):
        build_from_spec({**model.spec, "task": "tracking"})


def test_classification_recipes_keep_their_hash_and_the_task_joins_it_when_set() -> None:
    import hashlib
    import json

    plain = recipe_from_dict({})
    dump = plain.model_dump(mode="json")
    assert dump.pop("task") == "classification"
    assert dump["data"].pop("seed") is None  # unset data.seed hashes as if it did not exist, too
    assert dump.pop("allow_unverified") is False  # so does allow_unverified when false
    assert dump["quantize"].pop("qat") is None  # and quantize.qat when unset
    assert dump["quantize"].pop("bias_correction") is False  # and quantize.bias_correction when false
    assert plain.sha256() == hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
    assert recipe_from_dict({"task": "segmentation"}).sha256() != plain.sha256()


def test_only_flips_at_near_ties_within_rounding_count_as_agreement() -> None:
    from exporters.parity import tie_flips

    reference = torch.tensor([[1.0, 1.0 - 1e-7], [2.0, 0.0], [1.0, 1.0 - 1.5e-3], [1.0, 0.0]]).view(
        4, 2, 1, 1
    )
    candidate = torch.tensor([[1.0 - 2e-7, 1.0], [0.0, 2.0], [1.0 - 1.1e-3, 1.0 - 3e-4], [0.9, 0.0]]).view(
        4, 2, 1, 1
    )
    # a rounding-sized tie; a real flip; a flip that needs more than 1e-3 of difference; no flip
    assert tie_flips(reference, candidate).flatten().tolist() == [True, False, False, False]


def test_the_segmentation_quickstart_names_resolve() -> None:
    from toolchain.preflight import check_names
    from toolchain.recipe import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "deploy_examples" / "segmentation_quickstart.yaml"
    )
    check_names(recipe)  # task, attacks (pgd, segpgd), corruptions, runtimes
    assert recipe.task == "segmentation" and recipe.model.arch == "segnet"


class _ColumnOracle(torch.nn.Module):
    """Reads its label map off the image: class = which quarter of the width channel 0's value
    (the pixel's own x coordinate, on the clean image) falls in. Warp the image and its
    predictions move with it: only labels that move too keep its mIoU at 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([0.125, 0.375, 0.625, 0.875]).view(1, 4, 1, 1)
        return -((x[:, :1] - centres) ** 2) * 100


def _column_scene(n: int = 4, h: int = 32, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    ramp = ((torch.arange(w) + 0.5) / w).view(1, 1, 1, w).expand(n, 1, h, w)
    x = torch.cat([ramp, torch.full((n, 2, h, w), 0.5)], 1).contiguous()
    return x, (ramp[:, 0] * 4).long().clamp_max(3)


def test_a_geometric_corruption_warps_the_label_map_with_the_image() -> None:
    torch.manual_seed(0)
    x, y = _column_scene()
    model = _ColumnOracle()
    assert torch.equal(model(x).argmax(1), y)  # the oracle is right on clean images
    cfg = ValidateConfig.model_validate(
        {
            "samples": 4,
            "batch_size": 4,
            "attacks": [],
            "corruptions": {"names": ["elastic_transform"], "severities": [5]},
        }
    )
    (ev,) = evaluate(
        model,
        {"torch": TorchRunner(model, InputSpec(3, 32, 64))},
        [(x, y)],
        cfg,
        model_name="m",
        task="segmentation",
        class_names=["a", "b", "c", "d"],
        progress=False,
    )
    warped = ev.corruptions.per_corruption_miou["elastic_transform"]["5"]  # type: ignore[index]
    assert warped > 0.99  # measured 1.0 at severities 1, 3 and 5
    # Unwarped labels against the warped image: the warp shows as an mIoU drop (the old way).
    from toolchain.robustness.corruptions import corrupt

    xc = corrupt("elastic_transform", x, 5, seed=cfg.corruptions.seed * 1_000_003)
    assert mean_iou(confusion(model(xc).argmax(1), y, 4)) < warped
