"""Fixed-batch engines run under the suites through the batch adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporters.base import InputSpec
from exporters.batching import FixedBatchRunner, any_batch
from exporters.onnx import export_onnx
from exporters.ort_runner import OnnxRuntimeRunner
from toolchain.errors import InputSpecError
from toolchain.recipe import ValidateConfig
from toolchain.robustness.suite import evaluate


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).eval()


@pytest.fixture(scope="module")
def fixed_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, OnnxRuntimeRunner]:
    model = _model()
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    export_onnx(model, path, input_spec=InputSpec(3, 12, 12, 1), dynamic_batch=False)
    return model, OnnxRuntimeRunner(path, threads=1)


def test_adapter_splits_pads_and_keeps_only_real_rows(
    fixed_engine: tuple[nn.Module, OnnxRuntimeRunner],
) -> None:
    model, engine = fixed_engine
    assert engine.input_spec.batch == 1
    x = torch.rand(7, 3, 12, 12)
    with pytest.raises(InputSpecError, match="fixed batch"):
        engine(x)
    adapted = any_batch(engine)
    assert isinstance(adapted, FixedBatchRunner) and adapted.runtime == "onnxruntime"
    out = adapted(x)
    assert out.shape == (7, 5)
    assert (out - model(x).detach()).abs().max() < 1e-4


def test_padding_of_the_last_chunk_does_not_leak_into_results() -> None:
    from exporters.torch_runner import TorchRunner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    adapted = FixedBatchRunner(TorchRunner(net, InputSpec(3, 2, 2, 3)))  # an engine of batch 3
    x = torch.rand(5, 3, 2, 2)  # one full chunk and one padded chunk of 2 real images
    assert torch.allclose(adapted(x), net(x).detach(), atol=1e-6)
    assert any_batch(adapted) is adapted  # it already takes any batch size


def test_suite_runs_square_on_a_fixed_batch_engine(fixed_engine: tuple[nn.Module, OnnxRuntimeRunner]) -> None:
    model, engine = fixed_engine
    cfg = ValidateConfig.model_validate(
        {
            "attacks": [{"name": "square", "eps": "8/255", "queries": 5}],
            "corruptions": {"names": ["fog"], "severities": [3]},
        }
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(6, 3, 12, 12, generator=g), torch.randint(0, 5, (6,), generator=g))]
    (ev,) = evaluate(
        model, {"onnxruntime": any_batch(engine)}, data, cfg, model_name="pruned", progress=False
    )
    assert ev.samples == 6 and ev.parity is not None and ev.parity.top1_agreement == 1.0
    assert ev.attacks[0].mode == "black-box" and ev.attacks[0].samples == 6
