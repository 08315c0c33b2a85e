"""The validation suite: streamed evaluation, attack modes per runner, sample caps."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from exporters.base import InputSpec
from exporters.torch_runner import TorchRunner
from toolchain.recipe import ValidateConfig
from toolchain.robustness.suite import evaluate_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _config(**kw: object) -> ValidateConfig:
    base = {
        "attacks": [
            {"name": "pgd", "eps": "4/255", "steps": 2},
            {"name": "square", "eps": "4/255", "queries": 5, "samples": 12},
        ],
        "corruptions": {"names": ["gaussian_noise"], "severities": [1, 5]},
    }
    base.update(kw)
    return ValidateConfig.model_validate(base)


def test_evaluation_is_streamed_batches_are_not_kept() -> None:
    """Memory must not grow with samples: each batch is released once it has been evaluated."""
    model = _model()
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_while_streaming: list[int] = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            gc.collect()
            alive_while_streaming.append(sum(r() is not None for r in refs))
            x = torch.rand(8, 3, 8, 8, generator=g)
            refs.append(weakref.ref(x))
            yield x, torch.randint(0, 3, (8,), generator=g)

    runners = {"torch": TorchRunner(model, InputSpec(3, 8, 8))}
    (ev,) = evaluate_model(model, runners, batches(), _config(), model_name="dense", progress=False)
    assert ev["samples"] == 48
    # At most the batch in hand (and the one the loop variable still names) is alive.
    assert max(alive_while_streaming) <= 2, alive_while_streaming


def test_modes_caps_and_counts() -> None:
    model = _model()
    spec = InputSpec(3, 8, 8)
    runners = {"torch": TorchRunner(model, spec), "copy": TorchRunner(_model(), spec)}
    runners["copy"].runtime = "onnxruntime"  # a stand-in engine: any non-torch runtime
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(3)]
    evs = evaluate_model(model, runners, data, _config(), model_name="pruned", progress=False)
    by_runtime = {e["runtime"]: e for e in evs}
    torch_ev, engine_ev = by_runtime["torch"], by_runtime["onnxruntime"]
    assert [a["mode"] for a in torch_ev["attacks"]] == ["white-box", "black-box"]
    assert [a["mode"] for a in engine_ev["attacks"]] == ["transfer", "black-box"]
    square = engine_ev["attacks"][1]
    assert square["samples"] == 12 and 0 <= square["queries"] <= 5
    assert torch_ev["samples"] == engine_ev["samples"] == 30
    assert set(torch_ev["corruptions"]["per_corruption"]["gaussian_noise"]) == {"1", "5"}
    # Same weights and seed: the stand-in engine agrees with the reference exactly.
    assert engine_ev["parity"]["top1_agreement"] == 1.0 and engine_ev["parity"]["max_abs_diff"] == 0.0
    assert "engine-disagrees-with-torch" not in engine_ev["flags"]


def test_engine_disagreement_is_flagged() -> None:
    model = _model()
    spec = InputSpec(3, 8, 8)
    other = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    engine = TorchRunner(other, spec)
    engine.runtime = "onnxruntime"
    g = torch.Generator().manual_seed(2)
    data = [(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
    (ev,) = evaluate_model(
        model, {"onnxruntime": engine}, data, _config(attacks=[]), model_name="x", progress=False
    )
    assert ev["parity"]["top1_agreement"] < 1.0
    assert "engine-disagrees-with-torch" in ev["flags"]
