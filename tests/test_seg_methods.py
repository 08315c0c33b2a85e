"""Segmentation beyond the basics: INT8 files of a segmentation model, TRADES and mixed-noise
training per pixel, BAP and gated pruning of segnet, FGSM and APGD in the segmentation suite.
Tiny sizes: 64x32 scenes, segnet at width 0.5 (the style of test_segmentation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calibration.parity import PixelParityCounter
from exporters.base import InputSpec
from exporters.onnx import export_onnx
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain.data import load_data
from toolchain.data.driving_scenes import CLASS_NAMES
from toolchain.errors import UserError
from toolchain.models import build_model
from toolchain.preflight import budget_of, check
from toolchain.pruning import classifier_layers, prune_model
from toolchain.pruning.methods import PruneJob
from toolchain.recipe import AttackConfig, EvalAttackConfig, TrainConfig, ValidateConfig, recipe_from_dict
from toolchain.robustness.attacks.apgd import APGD
from toolchain.robustness.attacks.deepfool import deepfool, mean_pixel_margin
from toolchain.robustness.suite import build_suite_attacks, evaluate
from toolchain.rundir import RunLayout
from toolchain.stages.quantize import quantize_models
from toolchain.stages.runners import int8_parity, variant_labels, variant_runners
from toolchain.tasks import task_named
from toolchain.tasks.segmentation import IGNORE_INDEX
from toolchain.training import make_loader, train_model
from toolchain.training.losses import BatchLoss, trades_examples

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64  # scenes are 64 x 32
SPEC = InputSpec(3, 32, 64)


@pytest.fixture(scope="module")
def scenes():  # type: ignore[no-untyped-def]
    return load_data("driving-scenes", image_size=WIDTH, train_samples=24, val_samples=8, seed=3)


def _segnet(scenes) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_model(
        "segnet",
        num_classes=9,
        in_channels=3,
        mean=scenes.mean,
        std=scenes.std,
        width=0.5,
        task="segmentation",
    )


@pytest.fixture(scope="module")
def trained(scenes):  # type: ignore[no-untyped-def]
    """A segnet trained clean for a few epochs: far from chance, so attacks have pixels to flip."""
    model = _segnet(scenes)
    cfg = TrainConfig(epochs=6, lr=0.1, loss="clean", weight_decay=0.0)
    train_model(model, make_loader(scenes.train, 8, shuffle=True), cfg, progress=False)
    return model.eval()


def _val(scenes) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x, y = zip(*(scenes.val[i] for i in range(len(scenes.val))))
    return torch.stack(x), torch.stack(y)


# --- INT8 ---------------------------------------------------------------------------------------


def test_pixel_parity_counts_pixels_ties_and_flips_of_labelled_right_pixels_only() -> None:
    reference = torch.zeros(1, 2, 1, 4)
    reference[0, 0] = torch.tensor([[2.0, 2.0, 2.0, 1e-4]])  # pixel 3: a near-tie
    candidate = reference.clone()
    candidate[0, 1, 0, 1] = 3.0  # pixel 1 flips for real
    candidate[0, 1, 0, 2] = 3.0  # pixel 2 flips, but it is unlabelled
    candidate[0, 1, 0, 3] = 2e-4  # pixel 3 flips within rounding
    y = torch.tensor([[[0, 0, 255, 0]]])
    counter = PixelParityCounter()
    counter.add(reference, candidate, y)
    stats = counter.as_dict()
    assert stats["pixels"] == 4 and stats["samples"] == 1 and stats["ties"] == 1
    assert stats["top1_agreement"] == 0.5  # pixels 1 and 2 differ; the tie agrees
    assert stats["label_flip_rate"] == pytest.approx(1 / 3)  # of 3 labelled right pixels, one flipped
    assert stats["max_abs_diff"] == 3.0


def test_int8_files_of_segnet_calibrate_on_training_images_and_record_pixel_parity(  # type: ignore[no-untyped-def]
    scenes, trained, tmp_path: Path
) -> None:
    recipe = recipe_from_dict(
        {
            "task": "segmentation",
            "data": {"dataset": "driving-scenes", "image_size": WIDTH},
            "model": {"arch": "segnet"},
            "quantize": {
                "enabled": True,
                "samples": 8,
                "corruptions": ["fog"],
                "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1},
            },
            "validate": {
                "samples": 8,
                "batch_size": 8,
                "attacks": [{"name": "pgd", "eps": "2/255", "steps": 2}],
                "corruptions": {"names": ["fog"], "severities": [2]},
            },
        }
    )
    layout = RunLayout(tmp_path)
    export_onnx(trained, layout.onnx("pruned"), input_spec=SPEC)
    records = quantize_models(
        recipe, {"pruned": trained}, layout, lambda: make_loader(scenes.train, 8, shuffle=True, seed=3)
    )
    assert [r.calibration for r in records] == ["clean", "mixed"]
    assert records[1].counts == {"clean": 4, "corrupted": 2, "adversarial": 2}
    assert all(r.fusion["all_integer"] and r.quantized_nodes["Conv"] > 0 for r in records)
    fp32 = build_runner("onnxruntime", path=layout.onnx("pruned"), threads=1)
    labels = variant_labels("pruned", ["onnxruntime"], records, [])
    int8 = variant_runners(labels, layout, threads=1, spinning=False)
    assert set(int8) == {"onnxruntime/int8/clean", "onnxruntime/int8/mixed"}
    x, y = _val(scenes)
    parity = int8_parity(recipe, trained, fp32, int8, [(x, y)])
    for stats in parity.values():
        assert set(stats) == {"reference", "clean", "adversarial", "corrupted", "all"}
        clean = stats["clean"]
        assert clean["samples"] == 8 and clean["pixels"] == 8 * 32 * 64
        assert 0.8 < clean["top1_agreement"] <= 1.0 and 0.0 < clean["max_abs_diff"] < 5.0
        assert stats["all"]["pixels"] == 3 * 8 * 32 * 64
    # The INT8 runner in the suite: its own row, per-pixel parity against PyTorch, transfer PGD.
    runners = {"torch": TorchRunner(trained, SPEC), "onnxruntime": fp32, **int8}
    rows = evaluate(trained, runners, [(x, y)], recipe.validate, model_name="pruned", class_names=CLASS_NAMES)
    torch_row, fp32_row, *int8_rows = rows
    for row in int8_rows:
        assert row.precision == "int8" and row.miou is not None and row.parity is not None
        assert abs(row.miou - torch_row.miou) < 0.1  # type: ignore[operator]
        assert row.parity.compared == 8 * 32 * 64 and row.parity.top1_agreement < 1.0
        assert [a.mode for a in row.attacks] == ["transfer"]
    assert fp32_row.parity is not None and fp32_row.parity.top1_agreement == 1.0


# --- losses -------------------------------------------------------------------------------------

SEG = task_named("segmentation")


def test_pixel_trades_kl_is_zero_on_equal_outputs_positive_otherwise_and_ignores_unlabelled() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    y = torch.randint(4, (2, 3, 5))
    assert SEG.divergence(logits, logits, y) == 0.0
    moved = logits.clone()
    moved[0, :, 1, 2] += torch.tensor([3.0, 0.0, 0.0, 0.0])  # one pixel's distribution changes
    one = SEG.divergence(moved, logits, y)
    assert one > 0 and SEG.divergence(moved, logits, y, reduction="sum") == pytest.approx(float(one) * 30)
    y_ignored = y.clone()
    y_ignored[0, 1, 2] = IGNORE_INDEX  # that pixel unlabelled: no divergence anywhere else
    assert SEG.divergence(moved, logits, y_ignored) == 0.0


def test_trades_examples_raise_the_pixel_kl_and_a_trades_batch_adds_it_to_the_pixel_ce(
    scenes, trained
) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    attack = AttackConfig(eps=4 / 255, step_size=2 / 255, steps=3)
    with torch.no_grad():
        clean = trained(x)
        assert SEG.divergence(trained(x.clone()), clean, y) == 0.0  # adversarial input = clean input
    x_adv = trades_examples(trained, x, y, attack, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    with torch.no_grad():
        kl = float(SEG.divergence(trained(x_adv), clean, y))
        noise = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        assert kl > 10 * float(SEG.divergence(trained(noise), clean, y)) > 0  # the adversary climbs it
    cfg = TrainConfig(loss="trades", trades_beta=2.0, attack=attack)
    loss, logits = BatchLoss(cfg)(trained, x, y, adversarial=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = SEG.loss(logits, y) + 2.0 * SEG.divergence(trained(x_adv), logits, y)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("loss", ["trades", "mixed"])
def test_trades_and_mixed_noise_train_segnet_per_pixel(loss: str, scenes) -> None:  # type: ignore[no-untyped-def]
    model = _segnet(scenes)
    before = [p.detach().clone() for p in model.parameters()]
    attack = {"eps": 2 / 255, "step_size": 2 / 255, "steps": 1}
    cfg = TrainConfig(epochs=1, lr=0.05, loss=loss, attack=attack)  # type: ignore[arg-type]
    (stats,) = train_model(model, make_loader(scenes.train, 8, shuffle=True), cfg, progress=False)
    assert torch.isfinite(torch.tensor(stats["loss"])) and 0.0 <= stats["accuracy"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- pruning methods ----------------------------------------------------------------------------


def test_pixel_deepfool_reaches_the_mean_margin_boundary_of_the_clean_prediction(scenes, trained) -> None:  # type: ignore[no-untyped-def]
    x, _ = _val(scenes)
    with torch.no_grad():
        classes = trained(x).argmax(1)
        before = mean_pixel_margin(trained(x), classes)
    x_adv = deepfool(trained, x, steps=10, overshoot=0.02)
    with torch.no_grad():
        after = mean_pixel_margin(trained(x_adv), classes)
        flipped = (trained(x_adv).argmax(1) != classes).flatten(1).float().mean(1)
    assert (before > 0).all() and (after.abs() < 0.1 * before).all()  # each image at the boundary
    assert ((flipped > 0.3) & (flipped < 0.7)).all()  # where about half of its pixels flip
    assert 0 < float((x_adv - x).abs().max()) < 1.0


_ONE = {
    "epochs": 1,
    "lr": 0.01,
    "loss": "hybrid",
    "attack": {"eps": "2/255", "step_size": "2/255", "steps": 1},
}


@pytest.mark.parametrize(
    ("method", "section"),
    [
        ("bap", {"train": _ONE, "update_every": 1, "deepfool_steps": 2}),
        ("gated", {"train": {**_ONE, "loss": "mixed"}}),
    ],
)
def test_bap_and_gated_prune_segnet_to_target_keeping_the_classifier(
    method: str, section: dict, scenes
) -> None:  # type: ignore[no-untyped-def,type-arg]
    model = _segnet(scenes)
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
    assert result.target_met and result.macs_reduction == pytest.approx(2.0, rel=0.05)
    assert result.model.net.classifier.out_channels == 9
    assert result.model.eval()(example).shape == (1, 9, 32, 64)


# --- attacks ------------------------------------------------------------------------------------


def test_fgsm_and_apgd_lower_miou_and_transfer_to_onnxruntime_exactly(
    scenes, trained, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    path = export_onnx(trained, tmp_path / "dense.onnx", input_spec=SPEC)
    runners = {
        "torch": TorchRunner(trained, SPEC),
        "onnxruntime": build_runner("onnxruntime", path=path, threads=1),
    }
    attacks = [
        EvalAttackConfig(name="fgsm", eps=4 / 255),
        EvalAttackConfig(name="apgd", eps=4 / 255, steps=10),
        EvalAttackConfig(name="pgd", eps=4 / 255, steps=10),
    ]
    cfg = ValidateConfig(samples=8, batch_size=8, attacks=attacks, corruptions={"names": []})  # type: ignore[arg-type]
    torch_ev, ort_ev = evaluate(trained, runners, [(x, y)], cfg, model_name="dense", class_names=CLASS_NAMES)
    fgsm, apgd, pgd = torch_ev.attacks
    assert (fgsm.steps, apgd.steps) == (1, 10) and [a.mode for a in ort_ev.attacks] == ["transfer"] * 3
    assert (
        torch_ev.miou is not None and fgsm.miou is not None and apgd.miou is not None and pgd.miou is not None
    )
    assert apgd.miou < fgsm.miou < torch_ev.miou  # one step already hurts; the schedule hurts more
    assert apgd.miou <= pgd.miou + 0.02  # no weaker than PGD at the same budget and steps
    assert [a.miou for a in ort_ev.attacks] == [a.miou for a in torch_ev.attacks]
    assert [a.accuracy for a in ort_ev.attacks] == [a.accuracy for a in torch_ev.attacks]


def test_apgd_per_pixel_stays_in_the_ball_and_keeps_each_images_highest_loss_point(scenes, trained) -> None:  # type: ignore[no-untyped-def]
    x, y = _val(scenes)
    apgd = APGD(eps=4 / 255, steps=8)
    x_adv = apgd.attack_every_image(trained, x, y, torch.Generator().manual_seed(0), highest_loss=True)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = SEG.loss(trained(x), y, "none"), SEG.loss(trained(x_adv), y, "none")
    assert (adv > clean).all()  # every image's mean pixel loss went up


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ({"name": "square"}, "Square is a black-box search .*; use apgd, fgsm, pgd, segpgd"),
        ({"name": "fgsm", "norm": "l2", "eps": 0.5}, "'fgsm' supports norm linf"),
    ],
)
def test_attacks_not_defined_per_pixel_are_refused_with_the_alternatives(attack: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(UserError, match=message):
        build_suite_attacks([EvalAttackConfig(**attack)], "segmentation")


# --- the pipeline end to end ----------------------------------------------------------------------


_TINY = {
    "task": "segmentation",
    "device": "cpu",
    "data": {"dataset": "driving-scenes", "image_size": 32, "train_samples": 2, "val_samples": 2},
    "model": {"arch": "segnet", "width": 0.25},
}


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"loss": "trades"}},
        {"finetune": {"loss": "mixed"}},
        {"prune": {"method": "bap"}},
        {"prune": {"method": "gated"}},
        {"quantize": {"enabled": True}},
        {"validate": {"attacks": [{"name": "fgsm"}, {"name": "apgd"}]}},
    ],
)
def test_settings_once_refused_for_segmentation_pass_preflight(change: dict) -> None:  # type: ignore[type-arg]
    assert check(recipe_from_dict({**_TINY, **change})).task == "segmentation"


INT8_ROW = "evaluations[model=pruned,runtime=onnxruntime,precision=int8]"


@pytest.mark.e2e
def test_a_segmentation_run_with_bap_trades_int8_fgsm_and_apgd_reports_them_all(tmp_path: Path) -> None:
    from toolchain.pipeline import run_pipeline

    attack = {"eps": "2/255", "step_size": "2/255", "steps": 1}
    recipe = recipe_from_dict(
        {
            "name": "seg-tiny-int8",
            "task": "segmentation",
            "device": "cpu",
            "data": {
                "dataset": "driving-scenes",
                "image_size": 48,
                "train_samples": 16,
                "val_samples": 4,
                "batch_size": 8,
            },
            "model": {"arch": "segnet", "width": 0.25},
            "train": {"epochs": 1, "loss": "pgd", "attack": attack},
            "prune": {
                "method": "bap",
                "target": {"macs_reduction": 2.0},
                "bap": {"train": {"epochs": 1, "loss": "hybrid", "attack": attack}, "deepfool_steps": 2},
                "bn_recalibration_batches": 1,
            },
            "finetune": {"epochs": 1, "loss": "trades", "trades_beta": 1.0, "attack": attack},
            # The gates on INT8 agreement are not what this run is for (4 validation images).
            "quantize": {
                "enabled": True,
                "samples": 8,
                "calibrations": ["mixed"],
                "attack": attack,
                "gate": None,
            },
            "export": {"parity_samples": 4},
            "validate": {
                "samples": 4,
                "batch_size": 4,
                "attacks": [{"name": "fgsm", "eps": "2/255"}, {"name": "apgd", "eps": "2/255", "steps": 2}],
                "corruptions": {"names": ["fog"], "severities": [2]},
            },
            "bench": {"enabled": False},
            "gates": [
                {
                    "metric": f"{INT8_ROW}.parity_fp32.clean.pixels",
                    "op": ">=",
                    "threshold": 1,
                }
            ],
        }
    )
    report = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert report.passed, [g for g in report.gates + report.intrinsic_gates if not g.passed]
    assert report.models.pruned is not None and report.models.pruned.target_met
    int8 = next(e for e in report.evaluations if e.precision == "int8")
    assert int8.task == "segmentation" and int8.miou is not None and int8.calibration == "mixed"  # type: ignore[attr-defined]
    assert [(a.name, a.mode) for a in int8.attacks] == [("fgsm", "transfer"), ("apgd", "transfer")]
    assert int8.parity_fp32 is not None and int8.parity_fp32["clean"]["pixels"] == 4 * 24 * 48
    (entry,) = report.to_json()["quantization"]
    assert entry["vs_fp32"]["evaluated"] and entry["vs_fp32"]["clean_miou_drop"] is not None
