"""GPU paths: the same numbers on CUDA as on the CPU. Skipped where CUDA is absent (CI)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporters.base import InputSpec
from exporters.torch_runner import TorchRunner
from toolchain.robustness.attacks import build_attack
from toolchain.robustness.corruptions import CORRUPTIONS, corrupt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_corruptions_match_cpu_for_the_same_seed(name: str) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu = corrupt(name, x, 3, seed=7)
    gpu = corrupt(name, x.cuda(), 3, seed=7)
    assert gpu.device.type == "cuda"
    # Random draws come from a CPU generator, so only float rounding may differ.
    assert (gpu.cpu() - cpu).abs().max() < 2e-3


def test_torch_runner_on_cuda_agrees_with_cpu() -> None:
    model = _model()
    spec = InputSpec(3, 16, 16)
    x = torch.rand(8, 3, 16, 16)
    cpu = TorchRunner(model, spec)(x)
    gpu = TorchRunner(model, spec, device="cuda")(x)
    assert gpu.device.type == "cpu"  # runners hand logits back on the host
    assert (gpu - cpu).abs().max() < 1e-4
    half = TorchRunner(model, spec, device="cuda", precision="fp16")(x)
    assert (half.argmax(1) == cpu.argmax(1)).float().mean() >= 0.99


def test_pgd_on_cuda_stays_in_the_ball() -> None:
    model = _model().cuda()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    result = build_attack("pgd", eps=8 / 255, steps=5)(model, x, y)
    assert result.x_adv.device.type == "cuda"
    assert (result.x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_onnxruntime_cuda_provider_matches_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)")
    from exporters.onnx import export_onnx
    from exporters.ort_runner import OnnxRuntimeRunner

    model = _model()
    spec = InputSpec(3, 16, 16)
    path = export_onnx(model, tmp_path / "m.onnx", input_spec=spec)
    runner = OnnxRuntimeRunner(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = torch.rand(8, 3, 16, 16)
    assert (runner(x) - model(x).detach()).abs().max() < 1e-3
