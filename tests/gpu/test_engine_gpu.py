"""Real TensorRT engines and ONNX Runtime GPU providers. Skipped where they are absent (CI, and
every machine of this project so far): the same logic is tested with fakes in tests/test_engine.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from exporters.engine import EngineProfile, ensure_engine
from exporters.onnx import check_parity, export_onnx
from exporters.runtimes import build_runner
from exporters.tensorrt_runner import TensorRTRunner
from exporters.torch_runner import TorchRunner
from tests.test_exporters import SPEC, images, make

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]

needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="TensorRT is not installed (pip install robustprune[tensorrt])",
)


def _qdq(model: torch.nn.Module, fp32: Path, scheme: str) -> Path:
    from calibration.qdq import quantize_onnx

    return quantize_onnx(fp32, fp32.with_name(f"m.{scheme}.onnx"), images(64).numpy(), scheme=scheme).path


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_stage_builds_each_precision_and_it_agrees_with_torch(precision: str, tmp_path: Path) -> None:
    model = make("residual")
    fp32 = export_onnx(model, tmp_path / "m.onnx", input_spec=SPEC)
    source = _qdq(model, fp32, "s8s8") if precision == "int8" else fp32
    profile = EngineProfile(min_batch=1, opt_batch=4, max_batch=8)
    record = ensure_engine(source, tmp_path / "engines", precision, profile)
    assert record.built and not ensure_engine(source, tmp_path / "engines", precision, profile).built
    runner = TensorRTRunner(record.path)
    assert runner.precision == precision
    result = check_parity(TorchRunner(model, SPEC), runner, [images(1), images(7), images(12)])
    allowed = {"fp32": 1e-2, "fp16": 5e-2, "int8": 0.5}[precision]
    assert result.max_abs_diff < allowed, result
    assert result.top1_agreement >= (1.0 if precision == "fp32" else 0.9)


def test_onnxruntime_gpu_providers_record_what_ran(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = make("plain")
    path = export_onnx(model, tmp_path / "m.onnx", input_spec=SPEC)
    available = ort.get_available_providers()
    ran = 0
    for runtime, provider in (
        ("onnxruntime-cuda", "CUDAExecutionProvider"),
        ("onnxruntime-tensorrt", "TensorrtExecutionProvider"),
    ):
        if provider not in available:
            continue
        runner = build_runner(runtime, path=path, threads=1)
        assert runner.provider == provider and runner.device == "cuda"  # type: ignore[attr-defined]
        x = images(4)
        assert (runner(x) - model(x).detach()).abs().max() < 1e-2
        ran += 1
    if not ran:
        pytest.skip("this onnxruntime build has no GPU provider (pip install onnxruntime-gpu)")
