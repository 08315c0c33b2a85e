"""Low-rank factorisation: exact at full rank, costs as predicted, composable with channels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_methods import SIZE, X, dataset, job_for, zoo_model
from toolchain.models import build_from_spec
from toolchain.pruning import load_pruned, prune_model, save_pruned
from toolchain.pruning.graph import count_macs_params
from toolchain.pruning.lowrank import factorize, layer_shapes, rank_for_energy, replace_with_factors, spectra
from toolchain.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {
    "conv3x3-stride2": (nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv1x1-stride2": (nn.Conv2d(6, 10, 1, stride=2), (2, 6, 9, 9)),
    "conv3x5-no-bias": (nn.Conv2d(4, 8, (3, 5), padding=(1, 2), bias=False), (2, 4, 7, 7)),
    "linear": (nn.Linear(7, 5), (3, 7)),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_full_rank_factors_reproduce_the_layer(case: str) -> None:
    torch.manual_seed(0)
    layer, shape = LAYERS[case]
    x = torch.rand(shape)
    chain, record = factorize(layer, [len(s) for s in spectra(layer)])
    assert record["kind"] == ("svd" if "1x1" in case or case == "linear" else "tucker2")
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in chain)  # ordinary layers only
    with torch.no_grad():
        assert float((chain(x) - layer(x)).abs().max()) < 1e-5


def test_rank_for_energy() -> None:
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [rank_for_energy(sigma, e) for e in (0.1, 9 / 14, 0.7, 13 / 14, 1.0)] == [1, 1, 2, 2, 3]


def test_macs_and_params_fall_as_predicted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x = torch.rand(1, 3, 16, 16)
    shapes = layer_shapes(model, x)
    dense = count_macs_params(model, x)
    plan = {"2": [4, 6], "4": [5], "7": [3]}
    macs = dense[0] + sum(shapes[n].macs(r) - shapes[n].macs(None) for n, r in plan.items())
    params = dense[1] + sum(shapes[n].params(r) - shapes[n].params(None) for n, r in plan.items())
    records = replace_with_factors(model, plan)
    assert count_macs_params(model, x) == (macs, params) and macs < dense[0]
    assert [r["layer"] for r in records] == ["2", "4", "7"]


def _lowrank(target: float, **section: object) -> object:
    prune = {
        "method": "lowrank",
        "criterion": "magnitude",
        "target": {"macs_reduction": target},
        "lowrank": section,
    }
    return recipe_from_dict({"prune": prune}).prune


def test_channel_pruning_then_lowrank_reloads_from_its_spec(tmp_path: Path) -> None:
    model, data = zoo_model(), dataset()
    result = prune_model(model, job_for(model, data, reduction=3.0), _lowrank(3.0, channel_reduction=1.5))
    assert result.target_met and result.history and result.structure
    assert result.steps[0]["macs_reduction"] == pytest.approx(1.5, rel=0.05)  # the channel step
    save_pruned(
        tmp_path / "m.pt",
        spec=model.spec,
        history=result.history,
        state_dict=model.state_dict(),
        structure=result.structure,
    )
    reloaded, meta = load_pruned(tmp_path / "m.pt", build_from_spec, X)
    batch = torch.rand(4, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(batch), model(batch))
    assert meta["structure"] == result.structure


def test_robust_scoring_records_sensitivities_and_meets_the_target() -> None:
    model, data = zoo_model(), dataset()
    cfg = _lowrank(2.0, scoring="robust", probe_batches=1, probe_attack={"steps": 1})
    result = prune_model(model, job_for(model, data, reduction=2.0), cfg)
    assert result.target_met
    sensitivities = [layer["sensitivity"] for layer in result.info["layers"].values()]
    assert sensitivities and max(sensitivities) == 1.0 and min(sensitivities) >= 0.0
