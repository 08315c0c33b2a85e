"""Distillation from the dense model: ARD and RSLAD losses, the frozen teacher, the recipe rules."""

from __future__ import annotations

import copy
import math
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from toolchain.errors import RecipeError, UserError
from toolchain.recipe import TrainConfig, recipe_from_dict
from toolchain.recipe_train import DistillConfig
from toolchain.report.stage_results import ModelResult, read_result
from toolchain.rundir import FINETUNE, RunLayout
from toolchain.training import train_model
from toolchain.training.losses import LOSSES, BatchLoss, trades_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 10, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher / t) || softmax(student / t)) per image, averaged, by hand."""
    p = torch.softmax(teacher / t, 1)
    return (p * (p.log() - torch.log_softmax(student / t, 1))).sum(1).mean()


def test_every_loss_of_the_recipe_is_registered() -> None:
    literal = typing.get_args(TrainConfig.model_fields["loss"].annotation)
    assert sorted(literal) == LOSSES.names()


def test_ard_loss_equals_the_hand_computed_value() -> None:
    student, teacher = tiny_net(0).eval(), tiny_net(1).eval()
    x, y = batch()
    adv = x.flip(0)  # a fixed perturbation, so the expected value needs no attack
    cfg = TrainConfig(loss="ard", distill=DistillConfig(adv_weight=0.75, temperature=3.0))
    loss, logits = BatchLoss(cfg, perturb=lambda m, a, b: adv, teacher=teacher)(
        student, x, y, adversarial=True, generator=torch.Generator()
    )
    with torch.no_grad():
        expected = 0.75 * 9.0 * kl(teacher(x), student(adv), 3.0) + 0.25 * F.cross_entropy(student(x), y)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(logits, student(adv))


def test_rslad_crafts_against_the_teachers_soft_labels_and_equals_the_hand_computed_value() -> None:
    student, teacher = tiny_net(0).eval(), tiny_net(1).eval()
    x, y = batch()
    cfg = TrainConfig(
        loss="rslad",
        attack={"eps": 0.1, "step_size": 0.05, "steps": 3},
        distill=DistillConfig(adv_weight=5 / 6, temperature=2.0),
    )
    loss, _ = BatchLoss(cfg, teacher=teacher)(
        student, x, y, adversarial=True, generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        soft = teacher(x)
    x_adv = trades_examples(student, x, y, cfg.attack, torch.Generator().manual_seed(4), reference=soft)
    with torch.no_grad():
        expected = 5 / 6 * 4.0 * kl(soft, student(x_adv), 2.0) + 1 / 6 * 4.0 * kl(soft, student(x), 2.0)
        # the examples climb the KL to the teacher: far above a random point of the same ball
        noise = (x + 0.1 * (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1)).clamp(
            0, 1
        )
        assert kl(soft, student(x_adv), 1.0) > kl(soft, student(noise), 1.0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_the_corruption_term_adds_the_kl_to_the_teacher_on_corrupted_images() -> None:
    student, teacher = tiny_net(0).eval(), tiny_net(1).eval()
    x, y = batch()
    base = TrainConfig(loss="ard", distill=DistillConfig(corruption_weight=0.0))
    with_term = TrainConfig(
        loss="ard", distill=DistillConfig(corruption_weight=2.0, corruptions=["fog"], severities=[3])
    )
    same = {"adversarial": True}
    without, _ = BatchLoss(base, perturb=lambda m, a, b: x, teacher=teacher)(
        student, x, y, generator=torch.Generator(), **same
    )
    total, _ = BatchLoss(with_term, perturb=lambda m, a, b: x, teacher=teacher)(
        student, x, y, generator=torch.Generator(), **same
    )
    from toolchain.robustness.corruptions import corrupt

    g = torch.Generator()  # the draws the term makes: one corruption and severity each, then a seed
    torch.randint(1, (8,), generator=g), torch.randint(1, (8,), generator=g)
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    foggy = corrupt("fog", x, 3, seed=seed)
    with torch.no_grad():
        expected = 2.0 * kl(teacher(foggy), student(foggy), 1.0)
    assert float(expected) > 0
    assert float(total - without) == pytest.approx(float(expected), rel=1e-5)


def test_the_teacher_is_never_updated_and_always_in_eval_mode() -> None:
    teacher = tiny_net(1).train()  # the caller's mode, which must stay
    modes: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(m.training))
    before = copy.deepcopy(teacher.state_dict())
    cfg = TrainConfig(epochs=2, lr=0.1, loss="rslad", attack={"eps": 0.05, "step_size": 0.02, "steps": 2})
    history = train_model(
        tiny_net(0), [batch(seed=s) for s in range(3)], cfg, progress=False, teacher=teacher
    )
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert len(modes) == 6 and not any(modes)  # one teacher pass per batch, each in eval mode
    assert teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None for p in teacher.parameters())


def _pruned(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher)
    example = torch.rand(1, 3, 10, 10)
    tp.pruner.MetaPruner(
        student, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
        ignored_layers=[student[-1]],
    ).step()  # fmt: skip
    return student


def test_a_pruned_model_fine_tuned_with_ard_ends_closer_to_its_teacher_than_with_pgd() -> None:
    data = [batch(16, seed=s) for s in range(6)]
    teacher = tiny_net(1, width=16)
    dense_cfg = TrainConfig(epochs=4, lr=0.1, loss="pgd", attack={"eps": 0.05, "step_size": 0.02, "steps": 2})
    train_model(teacher, data, dense_cfg, progress=False)
    x = torch.cat([batch(16, seed=100 + s)[0] for s in range(4)])
    distances = {}
    for loss in ("pgd", "ard"):
        student = _pruned(teacher)
        cfg = dense_cfg.model_copy(update={"loss": loss, "epochs": 3, "lr": 0.05})
        train_model(student, data, cfg, progress=False, seed=7, teacher=teacher)
        with torch.no_grad():
            distances[loss] = float(kl(teacher.eval()(x), student.eval()(x), 1.0))
    assert distances["ard"] < 0.7 * distances["pgd"], distances


def test_distillation_needs_a_teacher_and_the_dense_training_cannot_have_one() -> None:
    with pytest.raises(UserError, match="distils from the dense model"):
        BatchLoss(TrainConfig(loss="ard"))
    with pytest.raises(RecipeError, match=r"finetune\.loss"):
        recipe_from_dict({"train": {"loss": "rslad"}})
    recipe = recipe_from_dict({"finetune": {"loss": "rslad", "distill": {"temperature": 4}}})
    assert recipe.finetune.distill.temperature == 4 and recipe.finetune.lr == 0.01


def test_segmentation_fine_tuned_with_rslad_runs_end_to_end(tmp_path: Path) -> None:
    from toolchain.pipeline import run_pipeline

    attack = {"eps": "2/255", "step_size": "2/255", "steps": 1}
    recipe = recipe_from_dict(
        {
            "name": "seg-rslad",
            "task": "segmentation",
            "device": "cpu",
            "data": {
                "dataset": "driving-scenes",
                "image_size": 32,
                "train_samples": 8,
                "val_samples": 2,
                "batch_size": 4,
            },
            "model": {"arch": "segnet", "width": 0.25},
            "train": {"epochs": 1, "loss": "pgd", "attack": attack},
            "prune": {
                "steps": 1,
                "importance_batches": 1,
                "target": {"macs_reduction": 2.0},
                "finetune_between": {"epochs": 0},
            },
            "finetune": {
                "epochs": 1,
                "loss": "rslad",
                "attack": attack,
                "distill": {"corruption_weight": 0.5, "corruptions": ["fog"], "severities": [2]},
            },
            "export": {"parity_samples": 2},
            "validate": {
                "samples": 2,
                "batch_size": 2,
                "attacks": [{"name": "pgd", "eps": "2/255", "steps": 1}],
                "corruptions": {"names": ["fog"], "severities": [1]},
            },
            "bench": {"enabled": False},
        }
    )
    report = run_pipeline(recipe, tmp_path / "run", progress=False)
    pruned = report.models.pruned
    assert pruned is not None and pruned.target_met
    finetune = read_result(RunLayout(tmp_path / "run"), FINETUNE, ModelResult)
    assert finetune is not None and len(finetune.epochs) == 1
    assert math.isfinite(finetune.epochs[0]["loss"]) and finetune.epochs[0]["adversarial"] == 1.0
    assert any(e.model == "pruned" and e.miou is not None for e in report.evaluations)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["bap", "iterative"])
def test_in_the_loop_training_distils_from_the_jobs_teacher(method: str) -> None:
    from toolchain.pruning import PruneJob, prune_model
    from toolchain.pruning.budget import Budget

    model, data = tiny_net(0, width=16), [batch(8, seed=s) for s in range(3)]
    teacher = copy.deepcopy(model)
    calls: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(m.training))
    loss = {"loss": "ard", "attack": {"eps": 0.05, "step_size": 0.02, "steps": 1}}
    section: dict[str, typing.Any] = {"method": method, "target": {"macs_reduction": 2.0}}
    if method == "iterative":
        section.update(criterion="magnitude", steps=2, finetune_between={"epochs": 1, **loss})
    else:
        section["bap"] = {"train": {"epochs": 1, **loss}, "update_every": 2}
    cfg = recipe_from_dict({"prune": section}).prune
    example = torch.zeros(1, 3, 10, 10)

    def prune(with_teacher: bool) -> typing.Any:
        student = copy.deepcopy(model)
        job = PruneJob(
            example, Budget("macs", 2.0), [student[-1]], lambda _o: data, progress=False,
            teacher=teacher if with_teacher else None,
        )  # fmt: skip
        return prune_model(student, job, cfg)

    assert prune(True).target_met and calls and not any(calls)  # the teacher ran, in eval mode
    with pytest.raises(UserError, match="distils from the dense model"):
        prune(False)
