"""ONNX export, metadata, parity and the torch / ONNX Runtime runners, on tiny CNNs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporters import onnx as onnx_export
from exporters.base import InputSpec, Runner
from exporters.errors import ExportError, InputSpecError, ParityError, UnknownNameError, UserError
from exporters.onnx import check_parity, export_onnx, onnx_input_spec, read_onnx_metadata
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.parity import float64_check
from exporters.runtimes import RUNTIMES, build_runner
from exporters.torch_runner import TorchRunner

SPEC = InputSpec(channels=3, height=16, width=16)
NUM_CLASSES = 5


# ----------------------------------------------------------------------------- tiny models


def _conv_bn(c_in: int, c_out: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Head(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.block = nn.Sequential(_conv_bn(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


class Normalize(nn.Module):
    """The first op of every exported model: pixels in [0, 1] to normalised inputs."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def plain() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 8), nn.MaxPool2d(2), _conv_bn(8, 12), Head(12))


def depthwise() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 8), _conv_bn(8, 8, groups=8), nn.Conv2d(8, 16, 1), nn.ReLU(), Head(16))


def normalized() -> nn.Module:
    return nn.Sequential(Normalize([0.5, 0.4, 0.3], [0.25, 0.2, 0.3]), _conv_bn(3, 8), Head(8))


MODELS = {"plain": plain, "residual": Residual, "depthwise": depthwise, "normalized": normalized}


def make(name: str) -> nn.Module:
    """A seeded model whose BatchNorm statistics are not the identity, so folding is tested."""
    torch.manual_seed(0)
    model = MODELS[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    """Structured images (smooth gradients plus a bright square) rather than pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 16)
    base = ramp.view(1, 1, 1, 16) * torch.rand(batch, 3, 1, 1, generator=g)
    base = base + ramp.view(1, 1, 16, 1) * torch.rand(batch, 3, 1, 1, generator=g)
    base[:, :, 4:10, 5:11] += torch.rand(batch, 3, 1, 1, generator=g)
    return (0.5 * base + 0.1 * torch.rand(batch, 3, 16, 16, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Every tiny model exported once with a dynamic batch: name -> (model, path)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in MODELS:
        model = make(name)
        out[name] = (
            model,
            export_onnx(model, root / f"{name}.onnx", input_spec=SPEC, metadata={"model": name}),
        )
    return out


# ----------------------------------------------------------------------------- export + parity


@pytest.mark.parametrize("name", list(MODELS))
def test_export_is_one_checked_file_with_named_dynamic_io(name: str, exported: dict) -> None:
    _, path = exported[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert read_onnx_metadata(path)["exporter"] == "dynamo"
    # Self-contained: no external-data file and no temporary file left in the folder.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"{n}.onnx" for n in MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_torch_on_batches_of_1_and_7(name: str, exported: dict) -> None:
    model, path = exported[name]
    runner = OnnxRuntimeRunner(path, threads=2)
    assert runner(images(1)).shape == (1, NUM_CLASSES)
    assert runner(images(7)).shape == (7, NUM_CLASSES)
    result = check_parity(TorchRunner(model, SPEC), runner, [images(1), images(7, seed=2), images(7, seed=3)])
    assert result.samples == 15
    assert result.max_abs_diff < 1e-4
    assert result.mean_abs_diff <= result.max_abs_diff
    assert result.top1_agreement == 1.0 and result.disagreements == 0
    assert result.require(atol=1e-4) is result


def test_metadata_round_trips_and_callers_mode_is_kept(tmp_path: Path) -> None:
    names = ["stop", "yield", "speed", "turn", "park"]
    model = make("normalized").train()
    path = export_onnx(
        model,
        tmp_path / "m.onnx",
        input_spec=SPEC,
        metadata={
            "class_names": names,
            "mean": [0.5, 0.4, 0.3],
            "std": [0.25, 0.2, 0.3],
            "recipe_sha256": "ab12",
        },
    )
    meta = read_onnx_metadata(path)
    assert json.loads(meta["class_names"]) == names
    assert json.loads(meta["mean"]) == [0.5, 0.4, 0.3] and json.loads(meta["std"]) == [0.25, 0.2, 0.3]
    assert meta["recipe_sha256"] == "ab12"
    assert meta["input_range"] == "[0, 1]"
    assert meta["num_classes"] == str(NUM_CLASSES)
    assert json.loads(meta["input_shape"]) == ["batch", 3, 16, 16]
    assert meta["robustprune_version"] and meta["precision"] == "fp32" and meta["opset"] == "18"
    runner = OnnxRuntimeRunner(path)
    assert runner.metadata == meta
    assert onnx_input_spec(path) == SPEC
    # The export ran in eval mode on the caller's module and then gave its training flags back.
    assert all(module.training for module in model.modules())
    assert check_parity(TorchRunner(model, SPEC), runner, [images(4)]).max_abs_diff < 1e-4


def test_class_names_must_match_the_logits(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="3 entries but the model outputs 5"):
        export_onnx(
            make("plain"), tmp_path / "m.onnx", input_spec=SPEC, metadata={"class_names": ["a", "b", "c"]}
        )
    assert not (tmp_path / "m.onnx").exists()


def test_model_must_return_logits_or_batch_first_tensors(tmp_path: Path) -> None:
    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()  # no batch axis

    with pytest.raises(ExportError, match=r"logits of shape \(N, num_classes\)"):
        export_onnx(Pooled(), tmp_path / "m.onnx", input_spec=SPEC)


def test_a_model_with_several_outputs_exports_them_all_by_name(tmp_path: Path) -> None:
    class Heads(nn.Module):  # a detector's raw heads: scores (N, A, K) and boxes (N, A, 4)
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.conv(x).flatten(2).transpose(1, 2)  # (N, H*W, 6)
            return f[..., :2], f[..., 2:].relu()

    model = Heads().eval()
    path = export_onnx(model, tmp_path / "d.onnx", input_spec=SPEC, output_names=["scores", "boxes"])
    meta = read_onnx_metadata(path)
    assert json.loads(meta["output_names"]) == ["scores", "boxes"] and meta["num_classes"] == "2"
    runner = OnnxRuntimeRunner(path)
    scores, boxes = runner(images(3))
    assert scores.shape == (3, 256, 2) and boxes.shape == (3, 256, 4)
    result = check_parity(TorchRunner(model, SPEC), runner, [images(3)])
    assert result.max_abs_diff < 1e-4 and result.samples == 3


def test_fixed_batch_export_rejects_other_batch_sizes(tmp_path: Path) -> None:
    model = make("plain")
    path = export_onnx(
        model, tmp_path / "b4.onnx", input_spec=InputSpec(3, 16, 16, batch=4), dynamic_batch=False
    )
    assert onnx_input_spec(path) == InputSpec(3, 16, 16, batch=4)
    runner = OnnxRuntimeRunner(path)
    assert runner.input_spec.batch == 4
    result = check_parity(TorchRunner(model, SPEC), runner, [images(4)])
    assert result.max_abs_diff < 1e-4
    with pytest.raises(InputSpecError, match="fixed batch of 4, got 3"):
        runner(images(3))


def test_torchscript_fallback_when_dynamo_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = make("residual")
    with caplog.at_level(logging.WARNING, logger="exporters.onnx"):
        path = export_onnx(model, tmp_path / "ts.onnx", input_spec=SPEC)
    assert "simulated dynamo failure" in caplog.text and "TorchScript" in caplog.text
    assert read_onnx_metadata(path)["exporter"] == "torchscript"
    runner = OnnxRuntimeRunner(path)
    assert runner.input_spec.batch is None
    result = check_parity(TorchRunner(model, SPEC), runner, [images(1), images(5)])
    assert result.max_abs_diff < 1e-4 and result.top1_agreement == 1.0


def test_a_batch_fixed_silently_by_dynamo_falls_back_to_a_dynamic_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch.export can specialise the batch without raising (torchvision's anchor generators
    did): the graph then refused every other batch size in ONNX Runtime. Such a graph is now
    caught and the TorchScript exporter tried. (Failed before: the fixed graph was written.)"""
    fixed = onnx.load(
        str(export_onnx(make("plain"), tmp_path / "f.onnx", input_spec=SPEC, dynamic_batch=False))
    )
    monkeypatch.setattr(onnx_export, "_export_dynamo", lambda *a, **k: fixed)
    model = make("plain")
    with caplog.at_level(logging.WARNING, logger="exporters.onnx"):
        path = export_onnx(model, tmp_path / "a.onnx", input_spec=SPEC)
    assert "fixed the batch size of pixels" in caplog.text
    assert read_onnx_metadata(path)["exporter"] == "torchscript"
    runner = OnnxRuntimeRunner(path)
    assert runner.input_spec.batch is None
    assert check_parity(TorchRunner(model, SPEC), runner, [images(1), images(3)]).max_abs_diff < 1e-4


def test_a_graph_whose_batch_no_exporter_keeps_dynamic_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = export_onnx(make("plain"), tmp_path / "f.onnx", input_spec=SPEC, dynamic_batch=False)
    proto = onnx.load(str(fixed))
    monkeypatch.setattr(onnx_export, "_export_dynamo", lambda *a, **k: proto)
    monkeypatch.setattr(onnx_export, "_export_torchscript", lambda *a, **k: proto)
    with pytest.raises(ExportError, match="could not keep the batch dimension dynamic"):
        export_onnx(make("plain"), tmp_path / "x.onnx", input_spec=SPEC)
    assert not (tmp_path / "x.onnx").exists()


def test_both_exporters_failing_is_an_export_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("nope")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    with pytest.raises(ExportError, match="both exporters"):
        export_onnx(make("plain"), tmp_path / "x.onnx", input_spec=SPEC)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- input validation


WRONG_INPUTS = {
    "channels": (torch.rand(2, 1, 16, 16), "expected shape"),
    "size": (torch.rand(2, 3, 32, 32), "resize the images"),
    "rank": (torch.rand(3, 16, 16), "expected shape"),
    "dtype": ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), "float32"),
    "float64": (torch.rand(2, 3, 16, 16, dtype=torch.float64), "x.float()"),
    "numpy": (torch.rand(2, 3, 16, 16).numpy(), "torch.from_numpy"),
}


@pytest.mark.parametrize("case", list(WRONG_INPUTS))
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_wrong_input_is_an_input_spec_error(case: str, runtime: str, exported: dict) -> None:
    model, path = exported["plain"]
    runner = TorchRunner(model, SPEC) if runtime == "torch" else OnnxRuntimeRunner(path)
    bad, hint = WRONG_INPUTS[case]
    with pytest.raises(InputSpecError, match=hint) as info:
        runner(bad)
    assert runner.name in str(info.value)


# ----------------------------------------------------------------------------- runners


def test_session_options_follow_the_thread_count(exported: dict) -> None:
    _, path = exported["plain"]
    for threads in (1, 2):
        options = OnnxRuntimeRunner(path, threads=threads).session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.inter_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(UserError, match="threads must be >= 0"):
        OnnxRuntimeRunner(path, threads=-1)


def test_onnxruntime_runner_reports_cpu_and_precision(
    exported: dict, caplog: pytest.LogCaptureFixture
) -> None:
    _, path = exported["plain"]
    runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
    assert (runner.runtime, runner.precision, runner.device) == ("onnxruntime", "fp32", "cpu")
    assert runner.name == "onnxruntime/fp32/cpu"
    with caplog.at_level(logging.WARNING, logger="exporters.ort_runner"):
        assert OnnxRuntimeRunner(path, precision="int8").precision == "int8"
    assert "file says 'fp32'" in caplog.text
    with pytest.raises(UserError, match="not available"):
        OnnxRuntimeRunner(path, providers=["NoSuchExecutionProvider"])


def test_precision_is_read_from_metadata(exported: dict, tmp_path: Path) -> None:
    # Stands in for an INT8 file from the calibration step: same graph, precision metadata set.
    proto = onnx.load(str(exported["plain"][1]))
    onnx.helper.set_model_props(proto, {**read_onnx_metadata(exported["plain"][1]), "precision": "int8"})
    onnx.save(proto, str(tmp_path / "q.onnx"))
    assert OnnxRuntimeRunner(tmp_path / "q.onnx").precision == "int8"


@pytest.mark.parametrize("reader", [read_onnx_metadata, onnx_input_spec, OnnxRuntimeRunner])
def test_missing_or_corrupt_file_is_a_one_line_user_error(reader: object, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not an onnx file\xff" * 10)
    for path in (tmp_path / "missing.onnx", corrupt):
        with pytest.raises(UserError) as info:
            reader(path)  # type: ignore[operator]
        assert str(path.name) in str(info.value) and "\n" not in str(info.value)


def test_torch_runner_runs_in_eval_mode_and_restores_training(exported: dict) -> None:
    model = make("residual").train()
    runner = TorchRunner(model, SPEC)
    out = runner(images(4))
    assert runner.model is model  # same device and dtype: no copy, later weight updates are seen
    assert model.training and all(m.training for m in model.modules())
    assert torch.allclose(out, model.eval()(images(4)).detach(), atol=1e-6)
    with pytest.raises(UserError, match="fp16 on CUDA only"):
        TorchRunner(model, SPEC, precision="fp16")
    with pytest.raises(UserError, match="precision must be one of"):
        TorchRunner(model, SPEC, precision="int4")


def test_build_runner_uses_the_registry(exported: dict) -> None:
    model, path = exported["depthwise"]
    assert {"torch", "onnxruntime", "tensorrt"} <= set(RUNTIMES.names())
    ort_runner = build_runner("onnxruntime", path=path, threads=1)
    torch_runner = build_runner("torch", model=model, input_spec=SPEC)
    assert isinstance(ort_runner, OnnxRuntimeRunner) and isinstance(torch_runner, TorchRunner)
    assert check_parity(torch_runner, ort_runner, [images(3)]).max_abs_diff < 1e-4
    known = "known: onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt, torch"
    with pytest.raises(UnknownNameError, match=known):
        build_runner("openvino", path=path)
    with pytest.raises(UserError, match="it takes: path, threads, providers, precision"):
        build_runner("onnxruntime", path=path, thread=2)


# ----------------------------------------------------------------------------- parity failures


class Shifted(Runner):
    """A fake candidate: the reference's logits plus a constant (NaN allowed)."""

    runtime = "fake"

    def __init__(self, reference: Runner, shift: float) -> None:
        super().__init__(input_spec=reference.input_spec)
        self.reference, self.shift = reference, shift

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reference(x).clone()
        out[:, 0] += self.shift
        return out


def test_parity_detects_disagreement_and_raises_with_numbers(exported: dict) -> None:
    reference = TorchRunner(exported["plain"][0], SPEC)
    result = check_parity(reference, Shifted(reference, 100.0), [images(6)])
    assert result.max_abs_diff == pytest.approx(100.0, rel=1e-4)
    assert result.mean_abs_diff == pytest.approx(100.0 / NUM_CLASSES, rel=1e-4)
    assert result.top1_agreement < 1.0 and result.disagreements > 0
    with pytest.raises(ParityError, match=r"max \|dlogit\| 1\.000e\+02.*top-1 agreement") as info:
        result.require(atol=1e-3)
    assert info.value.max_abs_diff == result.max_abs_diff


def test_parity_treats_nan_as_failure_and_needs_images(exported: dict) -> None:
    reference = TorchRunner(exported["plain"][0], SPEC)
    assert check_parity(reference, Shifted(reference, float("nan")), [images(2)]).max_abs_diff == float("inf")
    with pytest.raises(UserError, match="no images"):
        check_parity(reference, reference, [])


def test_a_model_past_the_protobuf_limit_is_written_with_its_weights_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Residual().eval()
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 256)  # stands in for 2 GiB
    path = export_onnx(model, tmp_path / "big.onnx", input_spec=SPEC)
    assert (tmp_path / "big.onnx.data").stat().st_size > 256 and not list(tmp_path.glob(".*tmp"))
    x = images(3)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(OnnxRuntimeRunner(path)(x), expected, atol=1e-5, rtol=1e-5)


def test_measuring_a_proto_that_cannot_be_serialised_counts_as_too_large() -> None:
    class Unmeasurable:  # upb serialises to measure; past 2 GiB that raises EncodeError
        graph = onnx.GraphProto()

        def ByteSize(self) -> int:
            raise onnx_export.EncodeError("Failed to serialize proto")

    assert onnx_export.exceeds_protobuf_limit(Unmeasurable())  # type: ignore[arg-type]
    assert not onnx_export.exceeds_protobuf_limit(onnx.ModelProto())


def test_float64_check_tells_rounding_from_a_wrong_export(exported: dict) -> None:
    model = exported["plain"][0]
    reference = TorchRunner(model, SPEC)
    faithful = float64_check(model, reference, [images(4)])  # the engine computes as PyTorch does
    assert faithful.engine_max_abs_diff == pytest.approx(faithful.torch_fp32_max_abs_diff, rel=1e-6)
    assert 0.0 < faithful.torch_fp32_max_abs_diff < 1e-4 and faithful.rounding_explains(2.0, atol=0.0)
    assert faithful.engine_top1_agreement == faithful.torch_fp32_top1_agreement == 1.0
    flipped = float64_check(model, Shifted(reference, 100.0), [images(6)])  # class 0 always wins
    assert flipped.engine_top1_agreement < flipped.torch_fp32_top1_agreement == 1.0
    wrong = float64_check(model, Shifted(reference, 0.01), [images(4)])
    assert wrong.engine_max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert not wrong.rounding_explains(2.0, atol=1e-3)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast
    broken = float64_check(model, Shifted(reference, float("nan")), [images(1)])
    assert broken.engine_max_abs_diff == float("inf") and not broken.rounding_explains(2.0, atol=1.0)


def test_importing_exporters_loads_no_tensorrt_and_no_cuda() -> None:
    code = (
        "import sys, exporters, exporters.runtimes, exporters.tensorrt, exporters.onnx, torch\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
