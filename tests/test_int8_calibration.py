"""INT8 calibration methods: each method's activation ranges against statistics computed by hand
from the raw values, and the Q/DQ file each writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibration.qdq import calibrate, quantize_methods, quantize_onnx
from calibration.ranges import BINS, Histogram, compute_range, range_methods
from calibration.select import Agreement, HeldOut, MixedPrecision, choose_method, keep_sensitive_fp32
from exporters.base import InputSpec
from exporters.errors import UnknownNameError, UserError
from exporters.onnx import export_onnx
from exporters.ort_runner import OnnxRuntimeRunner
from tests.conftest import quantize_stage
from toolchain.rundir import RunLayout

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(3, 8, 8)


def _hist(values: np.ndarray) -> Histogram:
    return Histogram.of([values], float(values.min()), float(values.max()))


def _with_outlier(seed: int = 0) -> np.ndarray:
    """100k values uniform in [0, 1) and one at 50: the outlier a calibrator should clip."""
    values = np.random.default_rng(seed).random(100_000)
    return np.concatenate([values, [50.0]])


def test_every_method_is_registered() -> None:
    assert range_methods() == ["entropy", "minmax", "mse", "percentile"]
    with pytest.raises(UnknownNameError, match="known: entropy, minmax, mse, percentile"):
        compute_range("kl", _hist(np.arange(4.0)))


def test_histogram_keeps_every_value_and_folds_magnitudes() -> None:
    values = np.array([-3.0, -1.0, 0.5, 2.0, 2.0])
    h = _hist(values)
    assert h.counts.sum() == 5 and len(h.counts) == BINS
    assert (h.edges[0], h.edges[-1]) == (-3.0, 3.0)  # symmetric around 0 when negatives exist
    counts, edges = h.magnitudes()
    assert counts.sum() == 5 and edges[0] == 0.0
    assert counts[np.searchsorted(edges, 1.0, "right") - 1] == 1  # |-1| lands where 1 would


def test_minmax_is_the_observed_range() -> None:
    values = np.random.default_rng(1).normal(size=5000)
    assert compute_range("minmax", _hist(values)) == (values.min(), values.max())


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_matches_numpy_quantiles(percentile: float) -> None:
    signed = np.random.default_rng(2).normal(size=50_000)
    h = _hist(signed)
    width = h.edges[1] - h.edges[0]
    tail = (100 - percentile) / 200
    low, high = compute_range("percentile", h, percentile)
    # Between the two order statistics around the quantile, give or take one bin.
    assert _bracket(signed, tail, width)[0] <= low <= _bracket(signed, tail, width)[1]
    assert _bracket(signed, 1 - tail, width)[0] <= high <= _bracket(signed, 1 - tail, width)[1]
    # A tensor without negatives (after a ReLU) keeps 0 and cuts only its top.
    relu = np.maximum(signed, 0)
    low, high = compute_range("percentile", _hist(relu), percentile)
    assert low == 0.0
    assert _bracket(relu, 1 - 2 * tail, width)[0] <= high <= _bracket(relu, 1 - 2 * tail, width)[1]


def _bracket(values: np.ndarray, q: float, width: float) -> tuple[float, float]:
    lower = float(np.quantile(values, q, method="lower"))
    return lower - width, float(np.quantile(values, q, method="higher")) + width


def test_mse_finds_the_brute_force_optimum_on_raw_values() -> None:
    # Laplace values: the 8-bit MSE-optimal clip is 9.89 b (Banner et al., ACIQ, 2019).
    values = np.random.default_rng(0).laplace(size=200_000)
    low, high = compute_range("mse", _hist(values))

    def raw_error(lo: float, hi: float) -> float:  # real 8-bit rounding of every value, clipped
        step = (hi - lo) / 255
        return float(np.mean((values - (np.clip(np.round((values - lo) / step), 0, 255) * step + lo)) ** 2))

    scales = np.linspace(0.01, 1.0, 100)
    best = min(raw_error(values.min() * s, values.max() * s) for s in scales)
    assert raw_error(low, high) <= 1.01 * best  # the histogram's choice is the brute-force optimum
    assert high == pytest.approx(9.89, abs=0.5) and low == pytest.approx(-high, rel=0.2)
    assert raw_error(low, high) < 0.8 * raw_error(values.min(), values.max())  # clipping pays


def test_entropy_is_not_decided_by_a_relus_zeros() -> None:
    # Half the values exactly 0 (a ReLU's off units), the rest exponential: no outlier to clip.
    rng = np.random.default_rng(3)
    values = np.concatenate([np.zeros(50_000), rng.exponential(size=50_000)])
    h = _hist(values)
    assert h.zeros == 50_000
    low, high = compute_range("entropy", h)
    # With the zeros in, the spike made the smallest threshold tried win (128 of 2048 bins).
    assert low == 0.0 and high > 0.3 * values.max() and high > 4 * 128 * values.max() / BINS


def test_entropy_clips_a_rare_outlier_to_the_bulk() -> None:
    values = _with_outlier()
    low, high = compute_range("entropy", _hist(values))
    # The bulk ends at 1, below the smallest threshold searched (128 of 2048 bins over [0, 50]).
    assert low == values.min() and high == pytest.approx(128 * 50 / BINS)
    # Signed values: the threshold is on magnitudes (1024 bins over [0, 50]), the same both sides.
    signed = np.concatenate([values, -values])
    low, high = compute_range("entropy", _hist(signed))
    assert high == pytest.approx(128 * 50 / (BINS // 2)) and low == -high
    # Laplace values: clipped, but far less than the outlier case (most values are spread out).
    laplace = np.random.default_rng(0).laplace(size=200_000)
    low, high = compute_range("entropy", _hist(laplace))
    assert 5 < high < laplace.max() - 1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "m.onnx"
    return export_onnx(_model(), path, input_spec=SPEC, metadata={"model": "pruned"})


def _images() -> np.ndarray:
    # Pixels with a few bright outliers, so the methods disagree on the input's range.
    x = torch.rand(64, *SPEC.shape(1)[1:], generator=torch.Generator().manual_seed(0)) * 0.5
    x[::16, 0, 0, 0] = 1.0
    return x.numpy()


def _input_quantization(path: Path) -> tuple[float, int]:
    """Scale and zero point of the QuantizeLinear on the graph's image input."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixels")
    return float(inits[node.input[1]]), int(inits[node.input[2]])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_each_method_writes_a_qdq_file_with_the_hand_computed_input_range(
    method: str, fp32_file: Path, tmp_path: Path
) -> None:
    images = _images()
    result = quantize_onnx(fp32_file, tmp_path / f"{method}.onnx", images, method=method, percentile=99.0)
    assert result.method == method
    assert (result.quantized_nodes["Conv"], result.quantized_nodes["Gemm"]) == (2, 1)
    scale, zero = _input_quantization(result.path)
    # The input's range is computed here from the raw pixels, independently of the file.
    h = _hist(images)
    expected_high = {
        "minmax": 1.0,
        "percentile": float(np.quantile(images, 0.99)),
        "entropy": compute_range("entropy", h)[1],
        "mse": compute_range("mse", h)[1],
    }[method]
    assert zero == 0  # uint8 activations whose range starts at 0
    assert scale == pytest.approx(expected_high / 255, rel=0.01 if method == "percentile" else 1e-6)
    if method in ("percentile", "entropy"):
        assert expected_high < 0.55  # the four bright pixels are clipped (MSE keeps so few)
    # The file runs and answers like its FP32 file on most images.
    x = torch.from_numpy(images)
    ref = OnnxRuntimeRunner(fp32_file, threads=1)
    got = OnnxRuntimeRunner(result.path, threads=1)
    agree = torch.cat([(ref(x[i : i + 1]).argmax(1) == got(x[i : i + 1]).argmax(1)) for i in range(16)])
    assert agree.float().mean() >= 0.75


def test_one_calibration_serves_every_method(fp32_file: Path, tmp_path: Path) -> None:
    calibration = calibrate(fp32_file, _images())
    assert calibration.samples == 64 and "pixels" in calibration.histograms
    tops = {m: calibration.ranges(m, 99.0)["pixels"][1] for m in range_methods()}
    # The logits keep their observed range under every method (clipped, the top ones would tie).
    logits = calibration.model.graph.output[0].name
    assert {calibration.ranges(m, 99.0)[logits] for m in range_methods()} == {
        (calibration.histograms[logits].low, calibration.histograms[logits].high)
    }
    assert tops["minmax"] == 1.0 and tops["percentile"] < 0.55 and tops["entropy"] < 0.55
    first, second = (calibration.write(tmp_path / f"{m}.onnx", method=m) for m in ("minmax", "entropy"))
    assert _input_quantization(first.path)[0] == pytest.approx(1.0 / 255)
    assert _input_quantization(second.path)[0] == pytest.approx(tops["entropy"] / 255)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_nncf_writes_a_u8s8_file_with_int8_symmetric_weights_and_its_own_bias_correction(
    fp32_file: Path, tmp_path: Path
) -> None:
    images = _images()
    calibration = calibrate(fp32_file, images)
    result = calibration.write(tmp_path / "nncf.onnx", method="nncf")
    assert (result.method, result.scheme, result.samples, result.bias_shift) == ("nncf", "u8s8", 64, None)
    model = onnx.load(str(result.path))
    inits = _initializers(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert (props["quant_method"], props["quant_scheme"], props["precision"]) == ("nncf", "u8s8", "int8")
    # Activations: uint8; the image input's range is the pixels' own, [0, max] (computed here).
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[2]].dtype == np.uint8 for n in activations)
    assert _input_quantization(result.path) == (pytest.approx(float(images.max()) / 255), 0)
    # Weights: stored as int8 with zero points 0 and one scale per output channel.
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {n.output[0]: n for n in model.graph.node}
    for conv in convs:
        weight = producers[conv.input[1]]
        assert weight.op_type == "DequantizeLinear"
        values, scale, zero = (inits[name] for name in weight.input)
        assert values.dtype == np.int8 and not zero.any() and scale.shape == (values.shape[0],)
    assert result.quantized_nodes["Conv"] == 2
    # ONNX Runtime runs every convolution of it as an integer kernel.
    from calibration.fusion import count_fused_kernels

    assert count_fused_kernels(result.path)["all_integer"]
    # The file runs and answers like its FP32 file.
    x = torch.from_numpy(images[:16])
    ref, got = OnnxRuntimeRunner(fp32_file, threads=1)(x), OnnxRuntimeRunner(result.path, threads=1)(x)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.75
    # A node named in exclude_nodes keeps float weights; our bias correction still applies on top.
    first = convs[0].name
    kept = calibration.write(
        tmp_path / "kept.onnx", method="nncf", exclude_nodes=[first], bias_correction=True
    )
    kept_model = onnx.load(str(kept.path))
    kept_producers = {n.output[0]: n for n in kept_model.graph.node}
    conv = next(n for n in kept_model.graph.node if n.name == first)
    assert conv.input[1] not in kept_producers and kept.quantized_nodes["Conv"] == 1
    assert kept.bias_shift is not None and set(kept.bias_shift) >= {convs[1].name}


def test_int8_activation_quantisers_become_uint8_with_the_same_values(
    fp32_file: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from calibration.nncf_ptq import unsigned_activations

    signed = quantize_onnx(fp32_file, tmp_path / "s8.onnx", _images(), scheme="s8s8").path
    model = unsigned_activations(onnx.load(str(signed)))
    inits = _initializers(model)
    quantisers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantisers and all(inits[n.input[2]].dtype == np.uint8 for n in quantisers)
    assert all(int(inits[n.input[2]]) == 128 for n in quantisers)  # int8 zero point 0, moved by 128
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    # Weights (int8) and biases (int32) untouched.
    assert weights and {inits[n.input[0]].dtype for n in weights} == {np.dtype(np.int8), np.dtype(np.int32)}
    unsigned = tmp_path / "u8.onnx"
    onnx.save(model, str(unsigned))
    # Run as the ONNX operators define them (no fused kernels): the same outputs to the bit.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = _images()[:8]
    outputs = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[
            0
        ]
        for path in (signed, unsigned)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_nncf_is_refused_for_tensorrts_signed_scheme(fp32_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nncf writes u8s8 files .* use a range method"):
        quantize_onnx(fp32_file, tmp_path / "x.onnx", _images(), scheme="s8s8", method="nncf")
    assert not (tmp_path / "x.onnx").exists()


def _planted_model() -> nn.Module:
    """A model that names an image's brightest colour channel (classes 0-2), with its second
    convolution made fragile to weight quantisation: the first convolution's channel 0 is
    always zero after the ReLU, and the second gives that channel a weight of 1000 in every
    filter. In FP32 that weight multiplies zeros; in INT8 it sets each filter's scale
    (1000 / 127), so the weights of 1 that carry the colours round to zero."""
    model = _model()
    with torch.no_grad():
        for module in (model[0], model[2], model[6]):
            module.weight.zero_()
            module.bias.zero_()
        model[0].bias[0] = -1.0
        for colour in range(3):
            model[0].weight[colour + 1, colour, 1, 1] = 1.0
            model[2].weight[colour + 1, colour + 1, 1, 1] = 1.0
            model[6].weight[colour, colour + 1] = 1.0
        model[2].weight[:, 0] = 1000.0
    return model


def _coloured(n: int, seed: int) -> np.ndarray:
    """Images whose label-th colour channel is 0.2 brighter on average."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SPEC.shape(1)[1:], generator=g) * 0.5
    x[torch.arange(n), torch.arange(n) % 3] += 0.2
    return x.numpy()


@pytest.mark.parametrize("method", ["minmax", "nncf"])
def test_mixed_precision_keeps_the_planted_layer_in_fp32(method: str, tmp_path: Path) -> None:
    fp32 = export_onnx(_planted_model(), tmp_path / "planted.onnx", input_spec=SPEC)
    calibration = calibrate(fp32, _coloured(32, seed=4))
    x = _coloured(64, seed=5)
    held_out = HeldOut.of(fp32, {"clean": x[:32], "adversarial": x[32:]})
    kwargs = {"scheme": "u8s8", "method": method, "per_channel": True, "percentile": 99.99}
    found = keep_sensitive_fp32(calibration, held_out, 0.95, **kwargs)  # type: ignore[arg-type]
    conv2 = [n.name for n in calibration.model.graph.node if n.op_type == "Conv"][1]
    assert found.all_int8.worst < 0.95  # the planted layer breaks the all-INT8 file
    assert found.fp32_nodes == [conv2] and found.met and found.final.worst >= 0.95
    assert max(found.sensitivity, key=found.sensitivity.__getitem__) == conv2
    # A target the all-INT8 file already meets keeps nothing in FP32.
    easy = keep_sensitive_fp32(calibration, held_out, found.all_int8.worst, **kwargs)  # type: ignore[arg-type]
    assert easy.fp32_nodes == [] and easy.met
    # Bounded to no FP32 layer, the search gives up after the all-INT8 file, without a sweep.
    capped = keep_sensitive_fp32(calibration, held_out, 0.95, max_fp32=0, **kwargs)  # type: ignore[arg-type]
    assert capped.fp32_nodes == [] and not capped.met and capped.sensitivity == {}


def test_auto_with_a_target_takes_the_method_needing_fewest_fp32_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The method agreeing best with every layer INT8 ("spread": its errors in every layer) needs
    four FP32 layers; "local" agrees worse but needs one; "never" cannot meet the target."""
    import calibration.select as select

    needs = {"spread": 4, "local": 1, "never": None}
    bounds: dict[str, int | None] = {}

    def fake_search(calibration, held_out, target, *, method, max_fp32=None, **options):  # type: ignore[no-untyped-def]
        bounds[method] = max_fp32
        n = needs[method]
        met = n is not None and (max_fp32 is None or n <= max_fp32)
        kept = [f"{method}{i}" for i in range(n if met and n is not None else (max_fp32 or 0))]
        worst = Agreement(0.5, 0.5)
        return MixedPrecision(target, target, kept, met, worst, Agreement(1.0, 1.0) if met else worst, {})

    monkeypatch.setattr(select, "keep_sensitive_fp32", fake_search)
    measured = {"local": Agreement(0.90, 0.90), "spread": Agreement(0.97, 0.96), "never": Agreement(0.8, 0.8)}
    method, mixed = select.fewest_fp32(None, measured, None, 0.99, adversarial_target=0.97)  # type: ignore[arg-type]
    assert method == "local" and mixed.fp32_nodes == ["local0"] and mixed.met
    # Searched best all-INT8 agreement first, each later one allowed one layer fewer than the best.
    assert list(bounds) == ["spread", "local", "never"] and bounds == {"spread": None, "local": 3, "never": 0}
    assert mixed.methods_fp32_layers == {"spread": 4, "local": 1, "never": None}
    assert mixed.as_dict()["methods_fp32_layers"] == {"spread": 4, "local": 1, "never": None}
    # A method that meets the target with every layer INT8 ends the search.
    bounds.clear()
    needs["spread"] = 0
    method, mixed = select.fewest_fp32(None, measured, None, 0.99)  # type: ignore[arg-type]
    assert (method, mixed.fp32_nodes, list(bounds)) == ("spread", [], ["spread"])
    # None meets it: the best all-INT8 method's search, marked unmet.
    needs.update(spread=None, local=None)
    method, mixed = select.fewest_fp32(None, measured, None, 0.99)  # type: ignore[arg-type]
    assert method == "spread" and not mixed.met and mixed.methods_fp32_layers == dict.fromkeys(needs)


def test_method_choice_measures_every_method(fp32_file: Path) -> None:
    calibration = calibrate(fp32_file, _images())
    x = torch.rand(48, *SPEC.shape(1)[1:], generator=torch.Generator().manual_seed(6)).numpy()
    held_out = HeldOut.of(fp32_file, {"clean": x[:24], "adversarial": x[24:]})
    best, measured = choose_method(
        calibration, quantize_methods(), held_out, scheme="u8s8", per_channel=True, percentile=99.0
    )
    assert set(measured) == {*range_methods(), "nncf"}
    assert measured[best].worst == max(a.worst for a in measured.values())
    assert all(0.0 <= a.clean <= 1.0 and a.adversarial is not None for a in measured.values())


def test_a_method_whose_quantiser_fails_is_left_out_of_the_choice(
    fp32_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from calibration.qdq import Calibration
    from exporters.errors import ExportError

    calibration = calibrate(fp32_file, _images())
    held_out = HeldOut.of(fp32_file, {"clean": _images()[:16]})
    write = Calibration.write

    def failing(self: Calibration, dst: Path, **kwargs: object) -> object:
        if kwargs["method"] == "nncf":
            raise ExportError("NNCF's quantization of m.onnx failed: unsupported op")
        return write(self, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Calibration, "write", failing)
    options = {"scheme": "u8s8", "per_channel": True, "percentile": 99.0}
    best, measured = choose_method(calibration, ["nncf", "minmax"], held_out, **options)  # type: ignore[arg-type]
    assert (best, set(measured)) == ("minmax", {"minmax"})
    assert "calibration method nncf failed on m.onnx" in caplog.text
    with pytest.raises(ExportError, match="unsupported op"):
        choose_method(calibration, ["nncf"], held_out, **options)  # type: ignore[arg-type]


def test_speed_record_says_why_an_int8_file_is_not_faster(fp32_file: Path, tmp_path: Path) -> None:
    from calibration.fusion import count_fused_kernels
    from calibration.speed import int8_speed, why_not_faster

    calibration = calibrate(fp32_file, _images())
    int8 = calibration.write(tmp_path / "int8.onnx").path
    first_conv = next(n.name for n in calibration.model.graph.node if n.op_type == "Conv")
    mixed = calibration.write(tmp_path / "mixed.onnx", exclude_nodes=[first_conv]).path
    fusion = count_fused_kernels(mixed)
    speed = int8_speed(
        fp32_file,
        mixed,
        fusion,
        batches=[1, 4],
        threads=1,
        iterations=3,
        warmup=1,
        all_int8=int8,
        macs=80_000,
    )
    assert set(speed["batches"]) == {"1", "4"}
    for row in speed["batches"].values():  # the ratios are the recorded times' ratios
        assert row["speedup"] == pytest.approx(row["fp32_p50_ms"] / row["int8_p50_ms"])
        assert row["mixed_precision_cost"] == pytest.approx(row["int8_p50_ms"] / row["all_int8_p50_ms"])
    assert speed["faster"] == all(r["speedup"] > 1 for r in speed["batches"].values())
    assert (speed["why_not"] is None) == speed["faster"]
    # The reason line, from the optimised graph's counts: one convolution left in float.
    line = why_not_faster(fusion, macs=80_000)
    assert line.startswith("ONNX Runtime runs 1 of 2 convolutions as integer kernels; 1 stay in float")
    qdq = sum(fusion["optimized_ops"].get(op, 0) for op in ("QuantizeLinear", "DequantizeLinear"))
    assert f"{qdq} quantise/dequantise nodes remain" in line and "0.04 MMACs per convolution" in line


def test_the_quantize_stage_records_method_fp32_layers_and_speed(tmp_path: Path) -> None:
    quantize = {
        "samples": 32,
        "holdout_samples": 64,
        "methods": ["minmax", "percentile"],
        "target_agreement": 0.95,
    }
    bench = {"batch_sizes": [1, 4], "iterations": 3, "warmup": 1, "threads": 1}
    x = torch.from_numpy(_coloured(96, seed=7))
    (record,) = quantize_stage(tmp_path, _planted_model(), x, quantize, bench=bench)
    assert record.method in ("minmax", "percentile") and set(record.methods_agreement or {}) == {
        "minmax",
        "percentile",
    }
    mixed = record.mixed_precision or {}
    convs = [
        n
        for n in onnx.load(str(RunLayout(tmp_path).quantized(record.file))).graph.node
        if n.op_type == "Conv"
    ]
    assert mixed["fp32_nodes"] == record.excluded_nodes and len(mixed["fp32_nodes"]) == 1 and mixed["met"]
    # auto with a target searched the methods for the fewest FP32 layers and says what each needed.
    assert mixed["methods_fp32_layers"][record.method] == 1
    assert set(mixed["methods_fp32_layers"]) <= {"minmax", "percentile"}
    assert record.holdout_agreement and record.holdout_agreement["clean"] >= 0.95
    assert record.holdout_agreement["adversarial"] is not None
    # The planted layer (the second convolution) kept float weights; the first has int8 ones.
    assert [c.name for c in convs][1] == mixed["fp32_nodes"][0]
    assert ["DequantizeLinear" in c.input[1] for c in convs] == [True, False]
    speed = record.speed or {}
    assert set(speed["batches"]) == {"1", "4"} and "mixed_precision_cost" in speed["batches"]["1"]


def test_auto_measures_nncf_for_onnxruntime_files_and_leaves_it_out_for_tensorrt(tmp_path: Path) -> None:
    quantize = {
        "samples": 32,
        "holdout_samples": 32,
        "targets": ["onnxruntime", "tensorrt"],
        "methods": ["minmax", "nncf"],
    }
    ort, trt = quantize_stage(tmp_path, _model(), torch.from_numpy(_coloured(64, seed=8)), quantize)
    assert (ort.target, trt.target) == ("onnxruntime", "tensorrt")
    assert set(ort.methods_agreement or {}) == {"minmax", "nncf"} and ort.method in ("minmax", "nncf")
    assert set(trt.methods_agreement or {}) == {"minmax"} and (trt.method, trt.scheme) == ("minmax", "s8s8")


def test_a_target_too_fine_for_the_held_out_images_is_named_with_the_images_it_needs() -> None:
    from toolchain.recipe import QuantizeConfig
    from toolchain.stages.quantize import coarse_target

    # 0.99 on 256 images allows 2.6 disagreements: one image decides.
    line = coarse_target(QuantizeConfig(target_agreement=0.99), 256)
    assert line is not None and "2.6 disagreements" in line and "holdout_samples to 500" in line
    assert coarse_target(QuantizeConfig(target_agreement=0.99), 500) is None
    # The stricter of the clean and the adversarial targets is the one that counts.
    strict = QuantizeConfig(target_agreement=0.9, target_adversarial_agreement=0.995)
    assert "holdout_samples to 1000" in (coarse_target(strict, 600) or "")
    assert coarse_target(QuantizeConfig(target_agreement=0.9), 256) is None
    assert coarse_target(QuantizeConfig(), 16) is None  # no target, nothing to resolve
    assert "lower the target below 1" in (coarse_target(QuantizeConfig(target_agreement=1.0), 256) or "")
