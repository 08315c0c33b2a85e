"""INT8: schemes, Q/DQ quantisation, fused-kernel counts, calibration sets, INT8-vs-FP32 parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibration.data import CalibrationMix, build_calibration_set
from calibration.fusion import count_fused_kernels
from calibration.parity import ParityCounter, compare_precisions
from calibration.qdq import quantize_onnx
from calibration.schemes import RUNTIME_SCHEMES, SCHEMES, scheme_for_runtime
from exporters.base import InputSpec, Runner
from exporters.errors import UnknownNameError, UserError
from exporters.onnx import export_onnx, read_onnx_metadata
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.tensorrt import engine_precision_of_onnx
from toolchain.robustness.attacks.pgd import pgd_attack
from toolchain.robustness.corruptions import corrupt

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(3, 16, 16)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SPEC.shape(1)[1:], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "m.onnx"
    return export_onnx(
        _model(), path, input_spec=SPEC, metadata={"model": "pruned", "class_names": list("abcd")}
    )


@pytest.fixture(scope="module")
def quantized(fp32_file: Path) -> dict[str, Path]:
    images = _images(32).numpy()
    return {
        scheme: quantize_onnx(fp32_file, fp32_file.with_name(f"m.{scheme}.onnx"), images, scheme=scheme).path
        for scheme in ("u8s8", "s8s8")
    }


def _zero_points(path: Path) -> dict[int, set[int]]:
    """Zero-point initialiser values by ONNX element type."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[int, set[int]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            init = inits[node.input[2]]
            out.setdefault(init.data_type, set()).update(numpy_helper.to_array(init).ravel().tolist())
    return out


def test_each_runtime_has_its_scheme() -> None:
    assert RUNTIME_SCHEMES == {"onnxruntime": "u8s8", "tensorrt": "s8s8"}
    trt = scheme_for_runtime("tensorrt")
    assert trt.activation_symmetric and trt.weight_symmetric and trt.activation_type == "int8"
    assert SCHEMES.get("u8s8").activation_type == "uint8"
    with pytest.raises(UnknownNameError, match="known: onnxruntime, tensorrt"):
        scheme_for_runtime("tvm")


def test_qdq_file_carries_int8_metadata_and_its_scheme(fp32_file: Path, quantized: dict[str, Path]) -> None:
    for scheme, path in quantized.items():
        meta = read_onnx_metadata(path)
        assert meta["precision"] == "int8" and meta["quant_scheme"] == scheme
        assert meta["model"] == "pruned" and meta["class_names"] == '["a", "b", "c", "d"]'  # source's kept
        assert engine_precision_of_onnx(path) == "int8"
    # TensorRT's scheme: every activation zero point is int8 0; the CPU scheme's are uint8.
    s8 = _zero_points(quantized["s8s8"])
    assert set(s8) == {onnx.TensorProto.INT8} and s8[onnx.TensorProto.INT8] == {0}
    assert onnx.TensorProto.UINT8 in _zero_points(quantized["u8s8"])


def test_per_channel_weights_have_one_scale_per_output_channel(quantized: dict[str, Path]) -> None:
    model = onnx.load(str(quantized["u8s8"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
    ]
    conv_scales = [inits[n.input[1]].shape for n in weight_dq if inits[n.input[0]].ndim == 4]
    assert conv_scales == [(16,), (16,)]


def test_int8_runner_follows_fp32_closely(fp32_file: Path, quantized: dict[str, Path]) -> None:
    fp32 = OnnxRuntimeRunner(fp32_file, threads=1)
    int8 = OnnxRuntimeRunner(quantized["u8s8"], threads=1)
    assert int8.precision == "int8"
    x = _images(64, seed=1)
    ref, got = fp32(x), int8(x)
    spread = float(ref.max() - ref.min())
    # 8-bit steps on two convs: errors a few percent of the logit range, never gross.
    assert float((ref - got).abs().max()) < 0.1 * spread


def test_fused_kernels_are_counted_from_the_optimised_graph(
    fp32_file: Path, quantized: dict[str, Path]
) -> None:
    u8 = count_fused_kernels(quantized["u8s8"])
    assert (u8["conv_nodes"], u8["integer_conv"], u8["float_conv"], u8["all_integer"]) == (2, 2, 0, True)
    assert u8["optimized_ops"].get("QLinearConv", 0) + u8["optimized_ops"].get("ConvInteger", 0) == 2
    fp = count_fused_kernels(fp32_file)
    assert (fp["conv_nodes"], fp["integer_conv"], fp["all_integer"]) == (2, 0, False)
    assert fp["float_conv"] == 2


def test_excluded_nodes_stay_float_and_unknown_names_are_refused(fp32_file: Path, tmp_path: Path) -> None:
    images = _images(8).numpy()
    with pytest.raises(UserError, match="not nodes of the"):
        quantize_onnx(fp32_file, tmp_path / "x.onnx", images, exclude_nodes=["no_such_conv"])
    assert not (tmp_path / "x.onnx").exists()
    pre = quantize_onnx(fp32_file, tmp_path / "all.onnx", images)
    assert pre.quantized_nodes["Conv"] == 2
    # The pre-processed graph names its convs; keep the first one in float.
    first_conv = next(n.name for n in onnx.load(str(pre.path)).graph.node if n.op_type == "Conv")
    part = quantize_onnx(fp32_file, tmp_path / "part.onnx", images, exclude_nodes=[first_conv])
    assert part.quantized_nodes["Conv"] == 1 and part.excluded_nodes == [first_conv]
    assert count_fused_kernels(part.path)["integer_conv"] == 1


def test_bad_quantize_arguments(fp32_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="calibration images must be"):
        quantize_onnx(fp32_file, tmp_path / "q.onnx", np.zeros((4, 1, 16, 16), np.float32))
    with pytest.raises(UserError, match="calibration method"):
        quantize_onnx(fp32_file, tmp_path / "q.onnx", _images(4).numpy(), method="vibes")
    with pytest.raises(UnknownNameError, match="quantization scheme 'u4'"):
        quantize_onnx(fp32_file, tmp_path / "q.onnx", _images(4).numpy(), scheme="u4")


def test_calibration_mix_counts_add_up() -> None:
    assert CalibrationMix(0.5, 0.25, 0.25).counts(10) == {"clean": 5, "corrupted": 3, "adversarial": 2}
    assert CalibrationMix().counts(7) == {"clean": 7, "corrupted": 0, "adversarial": 0}
    assert sum(CalibrationMix(1, 1, 1).counts(100).values()) == 100
    with pytest.raises(UserError, match="not all zero"):
        CalibrationMix(0, 0, 0).counts(4)


def test_calibration_set_perturbs_exactly_its_shares() -> None:
    model = _model()
    x, y = _images(12), torch.arange(12) % 4
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    images, counts = build_calibration_set(
        batches,
        10,
        CalibrationMix(0.4, 0.3, 0.3),
        corruptions=["gaussian_noise"],
        corrupt=corrupt,
        craft=lambda xs, ys: pgd_attack(model.eval(), xs, ys, eps=4 / 255, step_size=2 / 255, steps=2),
    )
    assert counts == {"clean": 4, "corrupted": 3, "adversarial": 3}
    diff = (images - x[:10]).abs().flatten(1).amax(1)
    assert torch.all(diff[:4] == 0)  # clean images untouched
    assert torch.all(diff[4:7] > 4 / 255)  # noise is larger than the attack budget
    assert torch.all(diff[7:] > 0) and torch.all(diff[7:] <= 4 / 255 + 1e-6)  # PGD stays in its ball
    with pytest.raises(UserError, match="only 12"):
        build_calibration_set(batches, 20, CalibrationMix())
    with pytest.raises(UserError, match="no PyTorch model"):
        build_calibration_set(batches, 4, CalibrationMix(1, 0, 1))


class _Fixed(Runner):
    runtime = "fake"

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(input_spec=SPEC)
        self.logits = logits

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_parity_counts_flips_of_correct_answers_only() -> None:
    counter = ParityCounter()
    reference = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    candidate = torch.tensor([[2.0, 0.0], [0.0, 2.5], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 0, 1])  # reference right on 0, 1, 3; wrong on 2
    counter.add(reference, candidate, y)
    stats = counter.as_dict()
    assert stats["top1_agreement"] == 0.5  # images 1 and 2 changed label
    assert stats["label_flip_rate"] == pytest.approx(1 / 3)  # of 3 right answers, image 1 flipped
    assert stats["max_abs_diff"] == 2.5


def test_compare_precisions_splits_by_input_kind() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    ref, same = _Fixed(logits), _Fixed(logits.clone())
    batches = [(_images(4), torch.zeros(4, dtype=torch.long))]
    out = compare_precisions(
        ref, {"same": same}, batches, corrupt=corrupt, corruptions=["fog", "gaussian_noise"]
    )
    assert out["same"]["clean"] == {
        "samples": 4,
        "top1_agreement": 1.0,
        "label_flip_rate": 0.0,
        "max_abs_diff": 0.0,
    }
    assert out["same"]["corrupted"]["samples"] == 8 and out["same"]["all"]["samples"] == 12
    assert "adversarial" not in out["same"]  # no model, no attack
