"""BatchNorm recalibration: true data statistics, no parameter touched, modes and momentum kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibration import recalibrate_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3),  # sees the data itself: its statistics can be checked directly
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),  # must be off while statistics are gathered
        nn.BatchNorm2d(8, momentum=0.3),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )


def make_data(batches: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1)
    shift = torch.tensor([1.0, -3.0, 0.2]).view(1, 3, 1, 1)
    return [(torch.randn(16, 3, 8, 8, generator=g) * scale + shift, torch.zeros(16)) for _ in range(batches)]


def perturb(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(5.0)
            m.running_var.mul_(10.0)


def test_first_bn_gets_the_data_statistics() -> None:
    model, data = make_model(), make_data()
    perturb(model)
    recalibrate_bn(model, data, batches=4)
    bn = model[0]
    images = torch.cat([x for x, _ in data])
    # momentum=None averages the per-batch estimates with equal weight.
    mean_of_batches = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in data]).mean(0)
    var_of_batches = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x, _ in data]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean_of_batches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, images.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var_of_batches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        bn.running_var, images.transpose(0, 1).flatten(1).var(dim=1), rtol=0.05, atol=0.0
    )
    assert int(bn.num_batches_tracked) == 4


def test_deeper_bn_matches_its_eval_time_inputs() -> None:
    """One batch of all the data: the second BN's mean is that of what it sees at inference."""
    model, data = make_model(), make_data()
    perturb(model)
    images = torch.cat([x for x, _ in data])
    recalibrate_bn(model, [images], batches=1)
    seen: list[torch.Tensor] = []
    handle = model[4].register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    model.eval()
    with torch.no_grad():
        model(images)
    handle.remove()
    inputs = seen[0]
    torch.testing.assert_close(model[4].running_mean, inputs.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        model[4].running_var, inputs.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-3, atol=1e-3
    )


def test_parameters_untouched_and_modes_and_momentum_restored() -> None:
    model = make_model().train()
    model[4].eval()  # a caller's frozen BN must stay frozen
    params = {k: v.clone() for k, v in model.named_parameters()}
    out = recalibrate_bn(model, make_data(), batches=2)
    assert out is model
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert model.training and model[0].training and not model[4].training and model[3].training
    assert model[0].momentum == 0.1 and model[4].momentum == 0.3
    assert int(model[0].num_batches_tracked) == 2  # fewer batches than the loader holds


def test_empty_loader_restores_old_statistics() -> None:
    model = make_model().eval()
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [], batches=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and model[0].momentum == 0.1
    with pytest.raises(ValueError, match="batches"):
        recalibrate_bn(model, make_data(), batches=0)


def test_model_without_batchnorm_is_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_bn(model, make_data(), batches=2) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
