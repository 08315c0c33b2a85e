"""Pruning methods: every method meets its budget, saves, reloads and exports; each method's
own property holds (HYDRA moves away from magnitude, BAP's budget adapts per sample, DNR
regrows, gates close on noise channels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters.base import InputSpec
from exporters.onnx import check_parity, export_onnx
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain.errors import UnknownNameError
from toolchain.models import build_from_spec, build_model
from toolchain.pruning import METHODS, PruneJob, load_pruned, prune_model, save_pruned
from toolchain.pruning.budget import Budget, BudgetError
from toolchain.pruning.graph import classifier_layers
from toolchain.pruning.methods import check_sections, method_settings
from toolchain.pruning.methods.bap import cubic_fraction, cutoff_scale
from toolchain.pruning.methods.dnr import drop_rate
from toolchain.recipe import RecipeError, recipe_from_dict
from toolchain.robustness.attacks.deepfool import deepfool

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, CLASSES = 16, 3
X = torch.zeros(1, 3, SIZE, SIZE)


def dataset(batches: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable toy task: the label is the brightest colour channel."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, CLASSES, (16,), generator=g)
        x = 0.35 * torch.rand(16, 3, SIZE, SIZE, generator=g)
        x[torch.arange(16), y] += 0.5
        out.append((x.clamp(0, 1), y))
    return out


def zoo_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "resnet20",
        num_classes=CLASSES,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        image_size=SIZE,
        width=0.5,
    ).eval()


def job_for(model: nn.Module, data: list[Any], reduction: float = 2.0) -> PruneJob:
    return PruneJob(
        X, Budget("macs", reduction), classifier_layers(model, X), lambda _o: data, progress=False
    )


def method_recipe(method: str, **section: Any) -> Any:
    prune: dict[str, Any] = {"method": method, "target": {"macs_reduction": 2.0}}
    if method == "iterative":
        prune.update(criterion="adv-taylor", steps=2, importance_batches=2, finetune_between={"epochs": 1})
    elif method in ("mrs", "lowrank"):
        prune.update(criterion="adv-taylor", importance_batches=2, **{method: section})
    else:
        prune[method] = {"train": {"epochs": 2, "lr": 0.05}, **section}
    return recipe_from_dict({"prune": prune}).prune


SECTIONS: dict[str, dict[str, Any]] = {
    "iterative": {},
    "hydra": {},
    "bap": {"update_every": 2},
    "dnr": {"update_every": 2},
    "gated": {"train": {"epochs": 2, "lr": 0.05, "mixed": {"corruptions": ["fog", "gaussian_noise"]}}},
    "mrs": {"probe_batches": 1},
    "lowrank": {},
}


def test_registry_lists_every_method() -> None:
    assert set(METHODS.names()) >= {"iterative", "hydra", "bap", "dnr", "gated", "mrs", "lowrank"}
    with pytest.raises(UnknownNameError, match="known: bap, dnr, gated, hydra, iterative, lowrank, mrs"):
        METHODS.get("hydr")


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_method_meets_budget_reloads_and_exports(method: str, tmp_path: Path) -> None:
    model, data = zoo_model(), dataset()
    result = prune_model(model, job_for(model, data), method_recipe(method, **SECTIONS[method]))
    assert result.method == method and result.target_met
    assert abs(result.macs_reduction / 2.0 - 1) <= 0.05, result.steps
    batch = data[0][0]
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (16, CLASSES) and torch.isfinite(out).all()
    save_pruned(
        tmp_path / "m.pt",
        spec=model.spec,
        history=result.history,
        state_dict=model.state_dict(),
        structure=result.structure,
    )
    reloaded, _ = load_pruned(tmp_path / "m.pt", build_from_spec, X)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), out)
    spec = InputSpec(3, SIZE, SIZE, None)
    export_onnx(model, tmp_path / "m.onnx", input_spec=spec)
    parity = check_parity(
        TorchRunner(model, spec), build_runner("onnxruntime", path=tmp_path / "m.onnx"), [batch]
    )
    assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-4


def test_unreachable_budget_fails_before_training() -> None:
    model, data = zoo_model(), dataset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match="out of reach"):
        prune_model(model, job_for(model, data, reduction=80.0), method_recipe("hydra"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_method_sections_are_typed_and_tied_to_the_method() -> None:
    def check(prune: dict[str, Any]) -> None:
        check_sections(recipe_from_dict({"prune": prune}).prune)

    with pytest.raises(RecipeError, match=r"unknown key 'prune\.hydra\.epochs'"):
        check({"method": "hydra", "hydra": {"epochs": 3}})
    with pytest.raises(RecipeError, match=r"prune\.dnr is set but prune\.method is 'bap'"):
        check({"method": "bap", "dnr": {}})
    with pytest.raises(RecipeError, match=r"prune\.steps configures the iterative method"):
        check({"method": "gated", "steps": 2})
    with pytest.raises(RecipeError, match=r"unknown key 'prune\.stepz'"):
        recipe_from_dict({"prune": {"stepz": 2}})  # not even a section: refused on load
    with pytest.raises(RecipeError, match=r"unknown key 'prune\.hydar'"):
        check({"method": "hydra", "hydar": {}})
    old = recipe_from_dict({"prune": {"criterion": "magnitude"}}).prune
    assert old.method == "iterative" and method_settings(old) is None
    partial = method_settings(
        recipe_from_dict({"prune": {"method": "hydra", "hydra": {"train": {"epochs": 1}}}}).prune
    )
    assert (partial.train.epochs, partial.train.loss, partial.train.lr) == (1, "trades", 0.1)  # type: ignore[union-attr]


# --- HYDRA -------------------------------------------------------------------------------------


def test_hydra_scores_move_and_keep_other_channels_than_magnitude() -> None:
    model, data = zoo_model(), dataset()
    cfg = method_recipe("hydra", train={"epochs": 3, "lr": 0.5, "loss": "pgd"})
    result = prune_model(model, job_for(model, data), cfg)
    assert result.info["score_change"] > 1e-3
    assert result.info["changed_from_magnitude"] > 0
    assert [e["changed_positions"] for e in result.steps][-1] > 0


def test_hydra_freezes_weights_and_restores_them() -> None:
    model, data = zoo_model(), dataset()
    conv = model.net.stem[0]
    before = conv.weight.detach().clone()
    cfg = method_recipe("hydra", train_bn=False)
    prune_model(model, job_for(model, data), cfg)
    kept = conv.weight.shape[0]
    # The stem's surviving filters are rows of the original weights, untouched by training.
    assert any(torch.equal(conv.weight[0], before[i]) for i in range(before.shape[0]))
    assert kept < before.shape[0] and all(p.requires_grad for p in model.parameters())


# --- BAP ---------------------------------------------------------------------------------------


class Linear2(nn.Module):
    """Two classes split by the plane x_0 = 0.5 (pixel 0 of channel 0; class 0 above): the
    distance of a sample to the boundary is |x_0 - 0.5|, which DeepFool must find."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0, 0, 0] - 0.5) * 10
        return torch.stack([s, -s], dim=1)


def test_deepfool_finds_the_distance_to_a_linear_boundary() -> None:
    x = torch.full((4, 1, 2, 2), 0.2)
    x[:, 0, 0, 0] = torch.tensor([0.45, 0.40, 0.30, 0.10])
    adv = deepfool(Linear2(), x, steps=5, overshoot=0.02, candidates=1)
    moved = (adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(moved, 1.02 * (0.5 - x[:, 0, 0, 0]), atol=2e-3, rtol=0)
    assert (Linear2()(x).argmax(1) == 1).all() and (Linear2()(adv).argmax(1) == 0).all()


def test_cutoff_scale_gives_each_sample_its_own_budget() -> None:
    x = torch.full((4, 1, 2, 2), 0.2)
    x[:, 0, 0, 0] = torch.tensor([0.45, 0.40, 0.30, 0.10])
    adv = deepfool(Linear2(), x, steps=5, overshoot=0.02, candidates=1)
    _out, budgets = cutoff_scale(x, adv, "batch-mean", 1.0)
    assert budgets.std() > 0  # not one eps for all
    assert budgets[0] < budgets[1] < budgets[2]  # nearer the boundary, smaller budget
    assert budgets[3] <= budgets.new_tensor(float((adv - x).flatten(1).pow(2).mean(1).sqrt().mean())) + 1e-6
    _, scaled = cutoff_scale(x, adv, 0.01, 0.5)
    assert torch.all(scaled <= 0.005 + 1e-6)


def test_bap_follows_the_cubic_schedule_and_logs_budgets() -> None:
    assert cubic_fraction(0.0, 0.4, 0.0) == 0.0
    assert cubic_fraction(1.0, 0.4, 0.0) == pytest.approx(0.4)
    assert cubic_fraction(0.5, 0.4, 0.0) == pytest.approx(0.4 * (1 - 0.5**3))
    model, data = zoo_model(), dataset()
    result = prune_model(model, job_for(model, data), method_recipe("bap", update_every=2, end=0.8))
    steps = [u["step"] for u in result.info["updates"]]
    assert steps[:4] == [2, 4, 6, 8]  # every update_every steps; 12 steps in all
    shares = [u["share"] for u in result.info["updates"]]
    assert shares[:4] == pytest.approx([cubic_fraction(k / 12 / 0.8, 1.0, 0.0) for k in steps[:4]])
    assert shares[-1] == 1.0
    macs = [u["macs"] for u in result.info["updates"]]
    assert macs == sorted(macs, reverse=True) and macs[-1] == result.macs
    budgets = result.trace["budgets"]
    assert result.info["budget_rms"]["batches"] == 12
    assert len(budgets) == 12 and all(lo <= mean <= hi for mean, lo, hi in budgets)
    assert any(hi > lo for _, lo, hi in budgets)


# --- DNR ---------------------------------------------------------------------------------------


def test_dnr_regrows_channels_and_ends_at_budget() -> None:
    assert drop_rate(0.3, 0.0) == pytest.approx(0.3) and drop_rate(0.3, 1.0) == pytest.approx(0.005)
    model, data = zoo_model(), dataset(batches=8)
    result = prune_model(
        model, job_for(model, data), method_recipe("dnr", update_every=2, drop_fraction=0.4, rewire_until=0.9)
    )
    assert result.info["revived_positions"] > 0  # dropped at one point, live at the end
    assert result.info["regrown_total"] > 0 and len(result.info["updates"]) >= 3
    assert result.target_met
    for update in result.info["updates"]:
        assert abs(result.dense_macs / update["macs"] / 2.0 - 1) <= 0.05  # at the budget at every rewiring


# --- gated -------------------------------------------------------------------------------------


class PlantedNet(nn.Module):
    """Eight signal channels from the image, eight channels of pure noise, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Conv2d(3, 8, 3, padding=1)
        self.noise = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)  # independent of the image: carries nothing about the label
        h = F.relu(self.bn(torch.cat([self.signal(x), self.noise(noise)], dim=1)))
        return self.fc(F.relu(self.mix(h)).mean(dim=(2, 3)))


def test_gates_close_on_channels_that_carry_only_noise() -> None:
    torch.manual_seed(0)
    model, data = PlantedNet(), dataset(batches=8)
    cfg = method_recipe(
        "gated",
        train={"epochs": 4, "lr": 0.05, "loss": "mixed", "mixed": {"corruptions": ["fog"]}},
        gate_lr=0.2,
        l1=1e-3,
        contribution_weight=1.0,
        allocation="global",
    )
    job = PruneJob(X, Budget("macs", 1.25, tolerance=0.1), [model.fc], lambda _o: data, progress=False)
    result = prune_model(model, job, cfg)
    gates, stability = result.info["gates"], result.info["stability"]
    assert gates["noise"] < 0.6 < 0.9 < gates["signal"]  # the noise gates closed, the signal ones stayed
    assert stability["noise"] < 0.6 < 0.8 < stability["signal"]
    # The noise branch lost channels, the signal branch kept all of its own.
    assert model.signal.out_channels == 8 and model.noise.out_channels < 8


# --- MRS ---------------------------------------------------------------------------------------


class SensitiveNet(nn.Module):
    """Two branches concatenated: ``seen`` reads the image, ``blind`` reads a constant grey
    image, so after training only ``seen`` carries the label: it is the sensitive group."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.blind = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x * 0 + 0.5
        return self.fc(torch.cat([self.seen(x), self.blind(grey)], dim=1).mean(dim=(2, 3)))


def test_mrs_spares_the_sensitive_group_and_meets_the_budget() -> None:
    from toolchain.recipe import TrainConfig
    from toolchain.training import train_model

    torch.manual_seed(0)
    model, data = SensitiveNet(), dataset(batches=8)
    train_model(model, data, TrainConfig(epochs=6, lr=0.1, loss="clean"), progress=False)
    cfg = recipe_from_dict(
        {
            "prune": {
                "method": "mrs",
                "criterion": "magnitude",
                "target": {"macs_reduction": 1.6},
                "mrs": {"probe_ratio": 0.5, "probe_attack": {"eps": "4/255", "steps": 2}},
            }
        }
    ).prune
    result = prune_model(model, job_for(model, data, reduction=1.6), cfg)
    groups = result.info["groups"]
    seen, blind = groups["seen.0"], groups["blind.0"]
    assert seen["sensitivity"] == 1.0 and blind["sensitivity"] < 0.2
    assert seen["keep_ratio"] > blind["keep_ratio"]
    assert result.target_met


# --- resuming in-the-loop training ------------------------------------------------------------


@pytest.mark.parametrize("method", ["hydra", "bap", "dnr", "gated"])
def test_in_loop_training_resumes_to_the_same_pruned_model(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from tests.test_training import Interrupt, _interrupt_at
    from toolchain.training import TrainCheckpoint

    cfg = method_recipe(method, **SECTIONS[method])
    batch = dataset(batches=1, seed=9)[0][0]

    def run(checkpoint: TrainCheckpoint | None) -> tuple[torch.Tensor, Any]:
        model, data = zoo_model(), dataset()
        result = prune_model(model, replace(job_for(model, data), checkpoint=checkpoint), cfg)
        with torch.no_grad():
            return model.eval()(batch), result

    expected, reference = run(None)
    checkpoint = TrainCheckpoint(tmp_path / "ckpt.pt", "prune-key")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, at_step=8)  # second epoch of two (6 batches each)
        with pytest.raises(Interrupt):
            run(checkpoint)
    assert checkpoint.path.is_file()
    got, result = run(checkpoint)
    assert torch.equal(got, expected)
    assert result.steps == reference.steps and result.info == reference.info
