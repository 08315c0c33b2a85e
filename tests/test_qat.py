"""Quantisation-aware fine-tuning (calibration/qat.py, qat_export.py): the fake-quantised model
trains, its Q/DQ file holds the trained scales, and ONNX Runtime computes what the fake-quantised
model computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibration.fusion import count_fused_kernels
from calibration.qat import (
    FakeQuantLayer,
    fold_batchnorm,
    init_activation_ranges,
    prepare_qat,
    qat_layers,
    qat_outputs,
)
from calibration.qat_export import export_qat
from calibration.ranges import Histogram, compute_range
from exporters.base import InputSpec
from exporters.errors import ExportError, UnknownNameError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(3, 8, 8)


def _model() -> nn.Module:
    """conv-BN-ReLU twice, pooled into a linear head; BatchNorm with statistics of its own."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SPEC.shape(1)[1:], generator=torch.Generator().manual_seed(seed))


def _trained(scheme: str, steps: int = 20) -> nn.Module:
    """A QAT model whose weights and activation scales moved away from their start (a few SGD
    steps on fixed random labels; at a learning rate five times this one the classifier's input
    scale, about 7e-4, is driven below zero, which the export refuses, see below)."""
    model = prepare_qat(_model(), _images(2), scheme)
    init_activation_ranges(model, _images().split(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _images(32, seed=1), torch.arange(32) % 4
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _session(path: Path, fused: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not fused:  # the Q/DQ nodes run as written: exactly what the file specifies
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, x: torch.Tensor, *, fused: bool) -> np.ndarray:
    session = _session(path, fused)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _one_step_of_the_output(model: nn.Module) -> float:
    """How far one quantisation step of every input of the last layer (whose logits stay float)
    can move a logit: its input scale x the largest L1 norm of a row of its int8-rounded weights."""
    q = qat_layers(model)["8"].quantization()
    weights = q.weight_int8.astype(np.float64) * q.weight_scale[:, None]
    return q.input_scale * float(np.abs(weights).sum(1).max())


@pytest.fixture(scope="module")
def u8_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _trained("u8s8")
    path = export_qat(model, tmp_path_factory.mktemp("qat") / "m.onnx", input_spec=SPEC).path
    return model, path


def test_onnx_runtime_runs_the_file_as_the_fake_quantised_model(u8_file: tuple[nn.Module, Path]) -> None:
    model, path = u8_file
    x = _images(48, seed=5)
    with torch.no_grad():
        expected = model(x).numpy()
    # Q/DQ as written: the same arithmetic up to float summation order.
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5
    # Fused integer kernels requantise each convolution's accumulator once; a rounding tie may
    # land on the other side, so the logits agree within one quantisation step of the output.
    fused = _run(path, x, fused=True)
    assert np.abs(fused - expected).max() <= _one_step_of_the_output(model)
    assert (fused.argmax(1) == expected.argmax(1)).mean() >= 0.95
    fusion = count_fused_kernels(path)
    assert (fusion["integer_conv"], fusion["conv_nodes"], fusion["all_integer"]) == (2, 2, True)
    # The first ReLU folded into the first convolution's requantisation (no Q/DQ pair around it);
    # the second, read by the pooling rather than a quantised layer, stays.
    assert fusion["optimized_ops"].get("Relu") == 1


def test_the_file_holds_the_trained_scales_and_integer_weights(u8_file: tuple[nn.Module, Path]) -> None:
    model, path = u8_file
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers = qat_layers(model)
    assert list(layers) == ["0", "3", "8"]  # the BatchNorms were folded, not wrapped
    for name, layer in layers.items():
        q = layer.quantization()
        assert q.input_scale != pytest.approx(1.0)  # initialised, then trained
        assert inits[f"{name}.0.input_scale"] == np.float32(float(layer.input_scale.detach()))
        assert inits[f"{name}.0.input_zero_point"].dtype == np.uint8
        weights = inits[f"{name}.0.weight_int8"]
        assert weights.dtype == np.int8 and np.abs(weights).max() == 127  # the largest hits the grid edge
        # Per output channel, symmetric: max |w| / 127, zero point 0.
        amax = layer.weight.detach().abs().flatten(1).amax(1).numpy()
        np.testing.assert_array_equal(inits[f"{name}.0.weight_scale"], (amax / 127).astype(np.float32))
        assert not inits[f"{name}.0.weight_zero_point"].any()
        assert inits[f"{name}.0.bias_int32"].dtype == np.int32
        np.testing.assert_allclose(
            inits[f"{name}.0.bias_scale"], q.input_scale * inits[f"{name}.0.weight_scale"], rtol=1e-6
        )
    # The second convolution's output is quantised (ONNX Runtime fuses only such convolutions);
    # the first one's is rounded after its ReLU, by the second's input grid; the logits are not.
    assert inits["3.0.output_scale"] == np.float32(float(layers["3"].output_scale.detach()))
    assert "0.0.output_scale" not in inits and "8.0.output_scale" not in inits
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4 + 3 + 3
    relu = next(n for n in graph.node if n.op_type == "Relu")
    readers = [n for n in graph.node if relu.output[0] in n.input]
    assert [n.name for n in readers] == ["3.0.input_q"]


def test_tensorrt_files_are_symmetric_with_zero_points_zero(tmp_path: Path) -> None:
    model = _trained("s8s8", steps=5)
    path = export_qat(model, tmp_path / "trt.onnx", input_spec=SPEC).path
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # int8 activations and weights, every zero point 0: what TensorRT's explicit quantisation takes.
    assert len(qdq) == 4 + 4 + 3 and all(inits[n.input[2]].dtype == np.int8 for n in qdq)
    assert not any(inits[n.input[2]].any() for n in qdq)
    # The bias stays float (TensorRT dequantises 8-bit inputs only), holding the rounded values
    # the fake-quantised layer added.
    q = qat_layers(model)["3"].quantization()
    assert q.bias_int32 is not None and q.bias_scale is not None
    np.testing.assert_array_equal(inits["3.0.bias"], q.bias_int32.astype(np.float32) * q.bias_scale)
    x = _images(16, seed=6)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5


def test_activation_scales_start_from_the_observed_ranges() -> None:
    model = prepare_qat(_model(), _images(2), "u8s8", learn_scales=False)
    x = _images()
    ranges = init_activation_ranges(model, x.split(16))
    first = qat_layers(model)["0"]
    # Pixels in [0, 1): the range [0, max] on 255 steps, zero point 0.
    assert ranges["0"]["input"] == (pytest.approx(float(x.min())), pytest.approx(float(x.max())))
    assert float(first.input_scale) == pytest.approx(float(x.max()) / 255)
    assert int(first.input_zero_point) == 0
    # The first convolution's output is rounded after its ReLU, by the second's input grid.
    second = qat_layers(model)["3"]
    assert not first.quantize_output and "output" not in ranges["0"]
    with torch.no_grad():
        activated = torch.relu(first.layer(x))
        out = second.layer(activated)
    assert ranges["3"]["input"] == (0.0, pytest.approx(float(activated.max())))
    assert int(second.input_zero_point) == 0
    # The second convolution's output (BatchNorm folded in) has both signs: an asymmetric grid.
    low, high = float(out.min()), float(out.max())
    assert low < 0 < high
    assert float(second.output_scale) == pytest.approx((high - low) / 255, rel=1e-5)
    assert int(second.output_zero_point) == round(-low / ((high - low) / 255))
    assert not first.input_scale.requires_grad  # learn_scales=False freezes them


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_other_methods_start_from_their_range_of_the_same_values(method: str) -> None:
    model = prepare_qat(_model(), _images(2), "u8s8")
    x = _images() * 0.5
    x[::16, 0, 0, 0] = 1.0  # a few bright outliers
    ranges = init_activation_ranges(model, x.split(16), method=method, percentile=99.0)
    values = x.numpy()
    # The range the method gives the raw values, though the images were streamed in batches.
    expected = compute_range(method, Histogram.of([values], float(values.min()), float(values.max())), 99.0)
    assert ranges["0"]["input"] == pytest.approx(expected)
    with pytest.raises(UnknownNameError, match="minmax"):
        init_activation_ranges(model, x.split(16), method="kl")


def test_learnt_scales_get_gradients_and_rounding_passes_them_straight_through() -> None:
    model = prepare_qat(_model(), _images(2), "u8s8")
    init_activation_ranges(model, _images().split(16))
    model(_images(8)).sum().backward()
    layer = qat_layers(model)["3"]
    assert layer.input_scale.grad is not None and float(layer.input_scale.grad) != 0.0
    assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0


def test_batchnorm_folds_into_the_convolution_before_it() -> None:
    model = _model()
    x = _images(8)
    with torch.no_grad():
        before = model(x)
    assert fold_batchnorm(model, x[:2]) == ["1", "4"]
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert model[0].bias is not None  # the folded shift became the convolution's bias
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


class _SharedOutput(nn.Module):
    """A convolution whose output is read by its BatchNorm and, unnormalised, by a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.bn.running_mean.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_batchnorm_that_cannot_be_folded_is_refused() -> None:
    with pytest.raises(UserError, match="read both by its BatchNorm and elsewhere"):
        prepare_qat(_SharedOutput().eval(), _images(2), "u8s8")


def test_export_refuses_a_model_without_fake_quantised_layers(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs a model from prepare_qat"):
        export_qat(_model(), tmp_path / "x.onnx", input_spec=SPEC)
    assert all(not isinstance(m, FakeQuantLayer) for m in _model().modules())


def test_a_collapsed_activation_scale_is_refused_at_export_naming_the_layer(tmp_path: Path) -> None:
    model = prepare_qat(_model(), _images(2), "u8s8")
    init_activation_ranges(model, _images().split(16))
    with torch.no_grad():
        qat_layers(model)["8"].input_scale.fill_(-7e-4)  # where too high a learning rate drove it
    with pytest.raises(ExportError, match=r"QAT layer 8: its bias does not fit the int32 grid.*qat.lr"):
        export_qat(model, tmp_path / "m.onnx", input_spec=SPEC)
    assert not (tmp_path / "m.onnx").exists()


def test_a_relu6_that_never_fires_still_lets_its_convolution_run_in_integers(tmp_path: Path) -> None:
    """A constant-zero activation gets a grid inside ReLU6's bound: ONNX Runtime drops the Clip
    and fuses the convolution before it (a grid up to 255 kept it float)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(8, 8, 1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second ReLU6 never fires on these images
    qat = prepare_qat(model, _images(2), "u8s8")
    ranges = init_activation_ranges(qat, _images().split(16))
    assert ranges["4"]["input"] == (0.0, 0.0)
    assert float(qat_layers(qat)["4"].input_scale.detach()) * 255 <= 6.0
    path = export_qat(qat, tmp_path / "dead.onnx", input_spec=SPEC).path
    x = _images(16, seed=3)
    with torch.no_grad():
        expected = qat(x).numpy()
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5
    fusion = count_fused_kernels(path)
    assert (fusion["integer_conv"], fusion["conv_nodes"]) == (3, 3)


class _Residual(nn.Module):
    """A stem whose activated output both a convolution and a residual addition read."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        return self.head((self.act2(self.conv(y)) + y).mean((2, 3)))


class _Checking(nn.Module):
    """A wrapper that checks what its network returns, so torch.fx cannot trace it whole."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError("logits expected")
        return out


def test_only_a_relu_read_by_quantised_layers_alone_moves_the_rounding_after_it() -> None:
    # A ReLU the residual addition also reads keeps the rounding before it: the runtime could not
    # fold it, and the convolution would stay in float.
    residual = prepare_qat(_Residual().eval(), _images(2), "u8s8")
    assert [layer.quantize_output for layer in qat_layers(residual).values()] == [True, True, False]
    # Through a wrapper torch.fx cannot trace, its network is traced instead.
    wrapped = prepare_qat(_Checking(_model()), _images(2), "u8s8")
    assert {n: layer.quantize_output for n, layer in qat_layers(wrapped).items()} == {
        "net.0": False,
        "net.3": True,
        "net.8": False,
    }


class _Block(nn.Module):
    """Two conv-BN layers plus the block's input: a ResNet basic block (a ReLU after the sum)
    or, without it, a MobileNetV2 inverted residual's sum."""

    def __init__(self, channels: int, *, relu: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.relu = relu
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x
        return self.act2(out) if self.relu else out


def _blocks() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8, relu=True),
        _Block(8, relu=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _trained_blocks(scheme: str) -> nn.Module:
    model = prepare_qat(_blocks(), _images(2), scheme)
    init_activation_ranges(model, _images().split(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002)
    x, y = _images(32, seed=1), torch.arange(32) % 4
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_residual_additions_are_rounded_with_their_inputs_and_run_as_integer_additions(
    tmp_path: Path,
) -> None:
    model = _trained_blocks("u8s8")
    outputs = qat_outputs(model)
    # The stem's ReLU (an addition reads it), the basic block after its ReLU, the other block's sum.
    assert list(outputs) == ["2.qat_output", "3.act2.qat_output", "4.qat_output"]
    layers = qat_layers(model)
    # A layer reading a rounded value shares its grid and does not round it again; the stem
    # convolution leaves its rounding to after its ReLU.
    assert layers["3.conv1"].input_scale is outputs["2.qat_output"].output_scale
    assert layers["4.conv1"].input_zero_point is outputs["3.act2.qat_output"].output_zero_point
    assert not layers["3.conv1"].quantize_input and not layers["0"].quantize_output
    assert layers["3.conv2"].quantize_output  # an addition's input
    scale = outputs["3.act2.qat_output"].output_scale
    assert scale.grad is not None and float(scale.grad) != 0.0  # it trained
    path = export_qat(model, tmp_path / "blocks.onnx", input_spec=SPEC).path
    x = _images(48, seed=5)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5
    assert (_run(path, x, fused=True).argmax(1) == expected.argmax(1)).mean() >= 0.95
    # ONNX Runtime adds integers: no float addition, ReLU or convolution is left.
    fusion = count_fused_kernels(path)
    ops = fusion["optimized_ops"]
    assert ops.get("QLinearAdd") == 2 and "Add" not in ops and "Relu" not in ops
    assert (fusion["integer_conv"], fusion["conv_nodes"]) == (5, 5)
    # One Q/DQ pair per rounded value: none added again in front of the layers that read it.
    graph = onnx.load(str(path)).graph
    assert not any(n.name.startswith("3.conv1.") and n.op_type == "QuantizeLinear" for n in graph.node)


def test_tensorrt_files_round_the_additions_symmetrically(tmp_path: Path) -> None:
    model = _trained_blocks("s8s8")
    path = export_qat(model, tmp_path / "trt.onnx", input_spec=SPEC).path
    graph = onnx.load(str(path)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    )
    adds = [n for n in graph.node if n.op_type == "Add"]
    producers = {n.output[0]: n for n in graph.node}
    assert len(adds) == 2 and all(producers[i].op_type == "DequantizeLinear" for n in adds for i in n.input)
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(constants[n.input[2]].dtype == np.int8 and not constants[n.input[2]].any() for n in qdq)
    x = _images(16, seed=6)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5


def test_an_addition_no_hook_reaches_stays_float() -> None:
    # _Residual adds in its top-level forward: nothing returns the sum, so it is not rounded.
    assert qat_outputs(prepare_qat(_Residual().eval(), _images(2), "u8s8")) == {}


def test_a_layer_reading_another_layers_rounded_output_shares_its_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),  # folded: the second convolution reads the first one's rounded output
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    qat = prepare_qat(model, _images(2), "u8s8")
    init_activation_ranges(qat, _images().split(16))
    layers = qat_layers(qat)
    assert layers["2"].input_scale is layers["0"].output_scale and not layers["2"].quantize_input
    path = export_qat(qat, tmp_path / "chain.onnx", input_spec=SPEC).path
    # One Q/DQ pair per rounded value: the input, between the convolutions, after the second
    # (the pooling reads it) and the classifier's input; none requantising between the two.
    quantize = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert quantize == ["0.0.input_q", "0.0.output_q", "2.0.output_q", "6.0.input_q"]
    x = _images(16, seed=7)
    with torch.no_grad():
        expected = qat(x).numpy()
    assert np.abs(_run(path, x, fused=False) - expected).max() < 1e-5


def test_mixed_precision_leaves_the_planted_layer_in_float_and_the_file_agrees(tmp_path: Path) -> None:
    """The post-training search's planted model (tests/test_int8_calibration.py): its second
    convolution loses the colours to per-channel weight rounding. QAT's search finds it on the
    fake-quantised model, and the file written with it in float agrees with FP32."""
    from calibration.qat_select import keep_sensitive_float
    from calibration.select import HeldOut
    from exporters.onnx import export_onnx
    from tests.test_int8_calibration import _coloured, _planted_model

    fp32 = export_onnx(_planted_model(), tmp_path / "planted.onnx", input_spec=SPEC)
    calibration = [torch.from_numpy(_coloured(32, seed=4))]
    x = _coloured(64, seed=5)
    held_out = HeldOut.of(fp32, {"clean": x[:32], "adversarial": x[32:]})
    example = calibration[0][:2]
    found = keep_sensitive_float(_planted_model(), example, "u8s8", calibration, held_out, 0.95)
    assert found.all_int8.worst < 0.95  # every layer rounded, the colours are lost
    assert found.fp32_nodes == ["2"] and found.met and found.final.worst >= 0.95
    assert max(found.sensitivity, key=found.sensitivity.__getitem__) == "2"
    # Never every layer: QAT needs one to quantise.
    assert (
        len(keep_sensitive_float(_planted_model(), example, "u8s8", calibration, held_out, 1.01).fp32_nodes)
        <= 2
    )

    qat = prepare_qat(_planted_model(), example, "u8s8", keep_float=found.fp32_nodes)
    init_activation_ranges(qat, calibration)
    assert set(qat_layers(qat)) == {"0", "6"} and isinstance(qat[2], nn.Conv2d)
    written = export_qat(qat, tmp_path / "mixed.onnx", input_spec=SPEC)
    graph = onnx.load(str(written.path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # The float layer's node reads its float weights, is recorded as kept, not as unmatched.
    assert [producers.get(c.input[1]) for c in convs] == ["DequantizeLinear", None]
    assert written.float_nodes == [convs[1].name] and written.unmatched_nodes == []
    xt = torch.from_numpy(x)
    with torch.no_grad():
        expected = qat(xt).numpy()
    assert np.abs(_run(written.path, xt, fused=False) - expected).max() < 1e-5
    reference = np.concatenate([held_out.reference["clean"], held_out.reference["adversarial"]])
    assert (_run(written.path, xt, fused=True).argmax(1) == reference).mean() >= 0.95


def test_keeping_an_unknown_layer_in_float_is_refused_naming_it() -> None:
    with pytest.raises(UserError, match=r"cannot keep 5, nope in float: not a Conv1d/2d/3d or Linear layer"):
        prepare_qat(_model(), _images(2), "u8s8", keep_float=["nope", "5"])
