"""Bias correction of INT8 files: a planted weight-rounding bias, measured by ONNX Runtime, taken
out of the int32 bias on its own grid, against means computed here from the file's integers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from calibration.bias import biased_layers, correct_bias, layer_means
from calibration.fusion import count_fused_kernels
from calibration.qdq import Calibration, calibrate
from exporters.base import InputSpec
from exporters.onnx import export_onnx
from tests.conftest import quantize_stage

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(3, 8, 8)
#: Every small weight of the first convolution: 0.508 of its int8 step (1/127), so it rounds
#: up to a whole step and each filter reads its 26 small weights 97% too high.
SMALL = 0.004


def _biased_model() -> nn.Sequential:
    """Conv -> ReLU -> Conv -> ReLU -> pool -> Linear, the first convolution planted so that its
    int8 weights shift every output channel up: each filter has one weight of 1 (which sets the
    per-channel scale to 1/127) and all others ``SMALL``, which round up on that grid."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        model[0].weight.fill_(SMALL)
        for channel in range(4):
            model[0].weight[channel, channel % 3, 1, 1] = 1.0
        model[0].bias.fill_(-0.1)
    return model


def _images(n: int, seed: int) -> np.ndarray:
    return torch.rand(n, *SPEC.shape(1)[1:], generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Calibration:
    path = export_onnx(_biased_model(), tmp_path_factory.mktemp("bias") / "m.onnx", input_spec=SPEC)
    return calibrate(path, _images(64, seed=0))


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _first_conv_by_hand(path: Path, x: np.ndarray) -> np.ndarray:
    """Per-channel mean of the file's first convolution, computed here in float64 from its own
    integers: the input rounded on its uint8 grid, the int8 weights and the int32 bias."""
    inits = _initializers(path)
    scale, zero = float(inits["pixels_scale"]), int(inits["pixels_zero_point"])
    xq = (np.clip(np.round(x.astype(np.float64) / scale) + zero, 0, 255) - zero) * scale
    w = inits["0.weight_quantized"] * inits["0.weight_scale"][:, None, None, None].astype(np.float64)
    b = inits["0.bias_quantized"] * inits["0.bias_quantized_scale"].astype(np.float64)
    y = F.conv2d(torch.from_numpy(xq), torch.from_numpy(w), torch.from_numpy(b), padding=1)
    return y.mean(dim=(0, 2, 3)).numpy()


def _fp32_first_conv(x: np.ndarray) -> np.ndarray:
    conv = _biased_model()[0].double()
    with torch.no_grad():
        return conv(torch.from_numpy(x).double()).mean(dim=(0, 2, 3)).numpy()


def _ort_means(path: Path, prepared: Calibration, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each biased layer's per-channel output mean as ONNX Runtime runs the file (the layer
    measured alone, the layers before it in integer kernels), by the FP32 graph's node name."""
    quantised = onnx.load(str(path))
    nodes = {n.name: n for n in quantised.graph.node}
    out = {}
    for layer in biased_layers(prepared.model):
        name = nodes[layer.node].output[0]
        out[layer.node] = layer_means(quantised, {name: layer.axis}, [{"pixels": x}])[name]
    return out


def _fp32_means(prepared: Calibration, x: np.ndarray) -> dict[str, np.ndarray]:
    layers = biased_layers(prepared.model)
    outputs = {layer.output: layer.axis for layer in layers}
    means = layer_means(prepared.model, outputs, [{"pixels": x}], optimize=False)
    return {layer.node: means[layer.output] for layer in layers}


def test_bias_correction_removes_the_planted_shift(prepared: Calibration, tmp_path: Path) -> None:
    calibration_x = _images(64, seed=0)
    plain = prepared.write(tmp_path / "plain.onnx")
    fixed = prepared.write(tmp_path / "fixed.onnx", bias_correction=True)
    first, second, head = (layer.node for layer in biased_layers(prepared.model))
    assert plain.bias_shift is None and fixed.bias_correction
    assert set(fixed.bias_shift or {}) == {first, second, head}

    # The planted shift, computed here from the file's integers and the FP32 weights: every
    # channel about 26 * 0.0039 * 0.5 = 0.05 too high.
    by_hand = _first_conv_by_hand(plain.path, calibration_x) - _fp32_first_conv(calibration_x)
    assert np.all(by_hand > 0.04) and np.all(by_hand < 0.06)
    before = _ort_means(plain.path, prepared, calibration_x)
    after = _ort_means(fixed.path, prepared, calibration_x)
    fp32 = _fp32_means(prepared, calibration_x)
    np.testing.assert_allclose(before[first] - fp32[first], by_hand, atol=1e-4)  # ONNX Runtime agrees
    assert (fixed.bias_shift or {})[first] == pytest.approx(np.abs(by_hand).mean(), abs=1e-4)

    # The int32 bias moved by the shift on its own grid (scale = input scale x weight scale).
    plain_inits, fixed_inits = _initializers(plain.path), _initializers(fixed.path)
    bias_scale = plain_inits["0.bias_quantized_scale"]
    np.testing.assert_array_equal(fixed_inits["0.bias_quantized_scale"], bias_scale)
    assert fixed_inits["0.bias_quantized"].dtype == np.int32
    moved = (fixed_inits["0.bias_quantized"] - plain_inits["0.bias_quantized"]) * bias_scale
    np.testing.assert_allclose(moved, -by_hand, atol=1e-4)

    # Every layer's mean error falls: the first to its grid, the later ones (corrected on the
    # corrected first layer's output) to well under what was left.
    for node in (first, second, head):
        error_before = np.abs(before[node] - fp32[node]).mean()
        error_after = np.abs(after[node] - fp32[node]).mean()
        assert error_after < 0.1 * error_before, node
    assert np.abs(after[first] - fp32[first]).max() < 1e-4


def test_the_correction_holds_on_images_it_did_not_see(prepared: Calibration, tmp_path: Path) -> None:
    x = _images(64, seed=9)
    plain = prepared.write(tmp_path / "plain.onnx")
    fixed = prepared.write(tmp_path / "fixed.onnx", bias_correction=True)
    fp32 = _fp32_means(prepared, x)
    before, after = _ort_means(plain.path, prepared, x), _ort_means(fixed.path, prepared, x)
    for node in fp32:
        assert np.abs(after[node] - fp32[node]).mean() < 0.25 * np.abs(before[node] - fp32[node]).mean()


def test_the_corrected_file_keeps_its_integer_kernels(prepared: Calibration, tmp_path: Path) -> None:
    plain = prepared.write(tmp_path / "plain.onnx")
    fixed = prepared.write(tmp_path / "fixed.onnx", bias_correction=True)
    assert fixed.quantized_nodes == plain.quantized_nodes
    assert (fixed.quantized_nodes["Conv"], fixed.quantized_nodes["Gemm"]) == (2, 1)
    fused_plain, fused_fixed = count_fused_kernels(plain.path), count_fused_kernels(fixed.path)
    assert fused_fixed["integer_conv"] == fused_plain["integer_conv"] == 2 and fused_fixed["all_integer"]
    assert fused_fixed["optimized_ops"] == fused_plain["optimized_ops"]
    onnx.checker.check_model(onnx.load(str(fixed.path)))
    props = {p.key: p.value for p in onnx.load(str(fixed.path)).metadata_props}
    assert props["quant_bias_correction"] == "true"
    assert "quant_bias_correction" not in {p.key for p in onnx.load(str(plain.path)).metadata_props}


@pytest.mark.parametrize("scheme", ["u8s8", "s8s8"])
def test_both_schemes_are_corrected_and_layers_kept_in_float_are_not(
    prepared: Calibration,
    tmp_path: Path,
    scheme: str,
) -> None:
    first, second, head = (layer.node for layer in biased_layers(prepared.model))
    fixed = prepared.write(
        tmp_path / "fixed.onnx", scheme=scheme, exclude_nodes=[second], bias_correction=True
    )
    assert set(fixed.bias_shift or {}) == {first, head}
    assert (fixed.bias_shift or {})[first] == pytest.approx(0.05, abs=0.01)
    # The layer kept in FP32 keeps its float bias, untouched.
    inits = _initializers(fixed.path)
    np.testing.assert_array_equal(inits["2.bias"], _biased_model()[2].bias.detach().numpy())


def test_a_float_bias_is_corrected_as_a_float(prepared: Calibration, tmp_path: Path) -> None:
    """A Q/DQ file whose first convolution's bias is a float constant (some quantisers leave it so)."""
    quantised = onnx.load(str(prepared.write(tmp_path / "plain.onnx").path))
    inits = {i.name: i for i in quantised.graph.initializer}
    dq = next(n for n in quantised.graph.node if n.output[0] == "0.bias")
    values = numpy_helper.to_array(inits[dq.input[0]]) * numpy_helper.to_array(inits[dq.input[1]])
    quantised.graph.node.remove(dq)
    quantised.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), "0.bias"))
    x = _images(64, seed=0)
    result = correct_bias(prepared.model, quantised, [{"pixels": x}])
    first = biased_layers(prepared.model)[0].node
    corrected = next(i for i in result.model.graph.initializer if i.name == "0.bias")
    np.testing.assert_allclose(numpy_helper.to_array(corrected), values - result.shifts[first], rtol=1e-6)
    assert result.shifts[first] == pytest.approx(0.05, abs=0.01)
    original = next(i for i in quantised.graph.initializer if i.name == "0.bias")
    np.testing.assert_array_equal(numpy_helper.to_array(original), values.astype(np.float32))  # a copy


def test_the_quantize_stage_records_bias_correction(tmp_path: Path) -> None:
    quantize = {
        "samples": 32,
        "method": "minmax",
        "targets": ["onnxruntime", "tensorrt"],
        "bias_correction": True,
    }
    records = quantize_stage(tmp_path, _biased_model(), torch.from_numpy(_images(32, seed=3)), quantize)
    assert [r.scheme for r in records] == ["u8s8", "s8s8"]
    for record in records:
        assert record.bias_correction and len(record.bias_shift or {}) == 3
        assert (record.bias_shift or {})[next(iter(record.bias_shift or {}))] == pytest.approx(0.05, abs=0.01)
        assert record.to_json()["bias_correction"] is True
    assert records[0].fusion["all_integer"]


class _TokenLinear(nn.Module):
    """A convolution, then a linear layer applied to each of the 64 positions (exported as MatMul
    + Add of a constant) whose weights are planted like the first convolution's: one of 1 per
    output, the rest ``SMALL``, so their int8 rounding shifts every output up."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.fill_(SMALL)
            for out in range(4):
                self.linear.weight[out, out] = 1.0
            self.linear.bias.copy_(torch.tensor([-0.25, 0.1, -0.05, 0.2]))  # a fine 8-bit grid
            self.conv.bias.fill_(1.0)  # inputs near 1, so the rounding shift is ~7 * 0.0039

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(self.linear(tokens).mean(1))


@pytest.mark.parametrize("scheme", ["u8s8", "s8s8"])
def test_a_matmul_and_its_add_are_corrected_on_the_constants_grid(tmp_path: Path, scheme: str) -> None:
    path = export_onnx(_TokenLinear().eval(), tmp_path / "tokens.onnx", input_spec=SPEC)
    x = _images(64, seed=0)
    prepared = calibrate(path, x)
    ops = {n.name: n.op_type for n in prepared.model.graph.node}
    (add,) = [layer for layer in biased_layers(prepared.model) if ops[layer.node] == "Add"]
    plain = prepared.write(tmp_path / "plain.onnx", scheme=scheme)
    fixed = prepared.write(tmp_path / "fixed.onnx", scheme=scheme, bias_correction=True)
    assert add.node in (fixed.bias_shift or {})
    fp32 = _fp32_means(prepared, x)[add.node]
    quantised = onnx.load(str(fixed.path))
    out = next(n for n in quantised.graph.node if n.name == add.node).output[0]
    fused = scheme == "u8s8"
    errors = []
    for file in (plain.path, fixed.path):
        got = layer_means(onnx.load(str(file)), {out: -1}, [{"pixels": x}], optimize=fused)[out]
        errors.append(np.abs(got - fp32))
    # The bias is an 8-bit constant (its own scale): corrected to within half of its step.
    inits = _initializers(fixed.path)
    add_inputs = {t for n in quantised.graph.node if n.name == add.node for t in n.input}
    (dq,) = [n for n in quantised.graph.node if n.output[0] in add_inputs and n.input[0] in inits]
    step = float(inits[dq.input[1]].max())
    assert errors[0].mean() > 4 * step  # planted: well above the grid
    assert errors[1].max() <= 0.5 * step + 1e-4
