"""TensorRT engine build and runner: version-dependent logic against a fake ``tensorrt`` module,
plus one real build that runs only where TensorRT and a GPU exist."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporters import tensorrt_runner as trt_runner_module
from exporters.engine import tensorrt_runner
from exporters.errors import ExportError, InputSpecError, RuntimeUnavailableError, UserError
from exporters.runtimes import build_runner, runtime_available
from exporters.tensorrt import (
    INSTALL_HINT,
    TensorRTRunner,
    build_engine,
    engine_precision_of_onnx,
    read_engine_sidecar,
)

pytestmark = pytest.mark.tensorrt

IMAGE = (3, 16, 16)


# ----------------------------------------------------------------------------- tiny ONNX files


def write_onnx(path: Path, kind: str = "fp32", batch: int | str = "batch") -> Path:
    """pixels -> GlobalAveragePool -> Flatten -> logits; ``kind`` adds fp16 casts or Q/DQ nodes."""
    nodes, inits, current = [], [], "pixels"
    if kind == "fp16":
        nodes += [
            helper.make_node("Cast", ["pixels"], ["half"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["half"], ["back"], to=TensorProto.FLOAT),
        ]
        current = "back"
    elif kind == "int8":
        inits += [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.01])]
        inits += [helper.make_tensor("zero", TensorProto.INT8, [], [0])]
        nodes += [
            helper.make_node("QuantizeLinear", ["pixels", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
        ]
        current = "dq"
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"])]
    nodes += [helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------- the fake tensorrt


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []


def fake_tensorrt(
    version: str, *, input_shape: tuple[int, ...] = (-1, *IMAGE), parse_ok: bool = True, build_ok: bool = True
) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` module that records the calls the builder makes.

    TensorRT 11 fakes have no ``BuilderFlag.FP16`` / ``INT8``, as in the real 11.x, so touching
    them fails the test.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    rec = Recorder()
    trt.rec = rec  # type: ignore[attr-defined]
    major = int(version.split(".")[0])
    flags = {"FP16": "FLAG_FP16", "INT8": "FLAG_INT8"} if major < 11 else {}
    trt.BuilderFlag = types.SimpleNamespace(TF32="FLAG_TF32", **flags)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="IN", OUTPUT="OUT")  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", INT8="i8")  # type: ignore[attr-defined]

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            rec.calls.append(("Logger", severity))

    class Network:
        num_inputs = 1

        def __init__(self, flags: int) -> None:
            self.flags = flags

        def get_input(self, index: int) -> Any:
            return types.SimpleNamespace(name="pixels", shape=input_shape)

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            rec.calls.append(("parse_from_file", Path(path).name))
            return parse_ok

        def get_error(self, index: int) -> str:
            return "unsupported operator FancyOp"

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            rec.calls.append(("set_shape", name, low, opt, high))

    class Config:
        def set_flag(self, flag: str) -> None:
            rec.calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            rec.calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile: Profile) -> None:
            rec.calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            rec.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            rec.calls.append(("build_serialized_network",))
            return b"serialized-engine" if build_ok else None

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser  # type: ignore[attr-defined]
    trt.Runtime = fake_runtime(trt, rec)  # type: ignore[attr-defined]
    return trt


def fake_runtime(trt: Any, rec: Recorder) -> type:
    """Runtime -> engine -> context; the context 'runs' the engine on host memory through ctypes:
    logits[n] = (mean, max, min) of image n, so the test can check the buffers were wired right."""

    class Context:
        def __init__(self) -> None:
            self.shape: tuple[int, ...] = ()
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            rec.calls.append(("set_input_shape", name, shape))
            self.shape = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.shape[0], 3)

        def set_tensor_address(self, name: str, address: int) -> None:
            self.addresses[name] = address

        def execute_async_v3(self, stream: int) -> bool:
            rec.calls.append(("execute_async_v3", stream))
            count = int(np.prod(self.shape))
            pixels = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["pixels"]))
            images = pixels.reshape(self.shape[0], -1)
            logits = np.ctypeslib.as_array(
                (ctypes.c_float * (3 * self.shape[0])).from_address(self.addresses["logits"])
            )
            logits[:] = np.stack([images.mean(1), images.max(1), images.min(1)], axis=1).ravel()
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, index: int) -> str:
            return ["pixels", "logits"][index]

        def get_tensor_mode(self, name: str) -> str:
            return trt.TensorIOMode.INPUT if name == "pixels" else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, *IMAGE) if name == "pixels" else (-1, 3)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(2, *IMAGE), (4, *IMAGE), (4, *IMAGE)]  # batch 2..4

        def get_tensor_dtype(self, name: str) -> str:
            return trt.DataType.FLOAT

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            rec.calls.append(("deserialize_cuda_engine", data))
            return Engine() if data == b"serialized-engine" else None

    return Runtime


def install(monkeypatch: pytest.MonkeyPatch, trt: types.ModuleType) -> Recorder:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt.rec  # type: ignore[attr-defined]


def named(rec: Recorder, name: str) -> list[tuple[Any, ...]]:
    return [call for call in rec.calls if call[0] == name]


# ----------------------------------------------------------------------------- builder logic


def test_onnx_precision_is_detected(tmp_path: Path) -> None:
    assert engine_precision_of_onnx(write_onnx(tmp_path / "a.onnx")) == "fp32"
    assert engine_precision_of_onnx(write_onnx(tmp_path / "b.onnx", "fp16")) == "fp16"
    assert engine_precision_of_onnx(write_onnx(tmp_path / "c.onnx", "int8")) == "int8"


@pytest.mark.parametrize(
    ("version", "kind", "precision", "flags", "network_flags"),
    [
        ("10.3.0", "fp32", "fp32", [], 0),
        ("10.3.0", "fp32", "fp16", ["FLAG_FP16"], 0),
        ("10.3.0", "int8", "int8", ["FLAG_INT8"], 0),
        ("11.1.0", "fp32", "fp32", [], 1 << 1),
        ("11.1.0", "fp16", "fp16", [], 1 << 1),
        ("11.1.0", "int8", "int8", [], 1 << 1),
    ],
)
def test_precision_flags_follow_the_tensorrt_version(
    version: str,
    kind: str,
    precision: str,
    flags: list[str],
    network_flags: int,
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    rec = install(monkeypatch, fake_tensorrt(version))
    engine = build_engine(
        write_onnx(tmp_path / "m.onnx", kind), tmp_path / "m.engine", precision=precision, workspace_mb=256
    )
    assert [call[1] for call in named(rec, "set_flag")] == flags
    assert named(rec, "create_network") == [("create_network", network_flags)]
    assert named(rec, "set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 256 * 2**20)]
    assert engine.read_bytes() == b"serialized-engine"
    sidecar = read_engine_sidecar(engine)
    assert sidecar["precision"] == precision and sidecar["tensorrt_version"] == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "m.onnx"]


def test_dynamic_batch_gets_a_min_opt_max_profile(tmp_path: Path, monkeypatch: Any) -> None:
    rec = install(monkeypatch, fake_tensorrt("10.3.0"))
    engine = build_engine(
        write_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", min_batch=2, opt_batch=16, max_batch=64
    )
    assert named(rec, "set_shape") == [("set_shape", "pixels", (2, *IMAGE), (16, *IMAGE), (64, *IMAGE))]
    assert len(named(rec, "add_optimization_profile")) == 1
    assert [read_engine_sidecar(engine)[k] for k in ("min_batch", "opt_batch", "max_batch")] == [2, 16, 64]


def test_fixed_batch_needs_no_profile(tmp_path: Path, monkeypatch: Any) -> None:
    rec = install(monkeypatch, fake_tensorrt("11.0.0", input_shape=(4, *IMAGE)))
    engine = build_engine(write_onnx(tmp_path / "m.onnx", batch=4), tmp_path / "m.engine")
    assert named(rec, "set_shape") == [] and named(rec, "add_optimization_profile") == []
    assert read_engine_sidecar(engine)["max_batch"] == 4


@pytest.mark.parametrize(
    ("version", "kind", "precision", "message"),
    [
        ("10.3.0", "fp32", "int8", "calibrators are not supported"),
        ("11.1.0", "fp32", "int8", "Q/DQ file"),
        ("11.1.0", "fp32", "fp16", "convert_to_fp16"),
        ("10.3.0", "int8", "fp32", "precision='int8'"),
        ("11.1.0", "fp16", "fp32", "precision='fp16'"),
    ],
)
def test_precision_the_file_cannot_give_is_refused(
    version: str, kind: str, precision: str, message: str, tmp_path: Path, monkeypatch: Any
) -> None:
    rec = install(monkeypatch, fake_tensorrt(version))
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        build_engine(write_onnx(tmp_path / "m.onnx", kind), tmp_path / "m.engine", precision=precision)
    assert named(rec, "build_serialized_network") == []
    assert not (tmp_path / "m.engine").exists()


def test_parse_and_build_failures_are_export_errors(tmp_path: Path, monkeypatch: Any) -> None:
    onnx_path = write_onnx(tmp_path / "m.onnx")
    install(monkeypatch, fake_tensorrt("10.3.0", parse_ok=False))
    with pytest.raises(ExportError, match="unsupported operator FancyOp"):
        build_engine(onnx_path, tmp_path / "m.engine")
    install(monkeypatch, fake_tensorrt("10.3.0", build_ok=False))
    with pytest.raises(ExportError, match="failed to build"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_bad_arguments_and_old_versions_are_refused(tmp_path: Path, monkeypatch: Any) -> None:
    onnx_path = write_onnx(tmp_path / "m.onnx")
    install(monkeypatch, fake_tensorrt("8.6.1"))
    with pytest.raises(RuntimeUnavailableError, match="needs TensorRT 10 or newer"):
        build_engine(onnx_path, tmp_path / "m.engine")
    with pytest.raises(UserError, match="min_batch <= opt_batch"):
        build_engine(onnx_path, tmp_path / "m.engine", min_batch=8, opt_batch=4)
    with pytest.raises(UserError, match="precision must be one of"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int4")


def test_missing_tensorrt_says_how_to_install(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    onnx_path = write_onnx(tmp_path / "m.onnx")
    with pytest.raises(RuntimeUnavailableError) as info:
        build_engine(onnx_path, tmp_path / "m.engine")
    assert str(info.value) == INSTALL_HINT
    with pytest.raises(RuntimeUnavailableError, match=r"pip install robustprune\[tensorrt\]"):
        build_runner("tensorrt", path=onnx_path, threads=2)


def test_runtime_available_explains_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime_available("torch") is None and runtime_available("onnxruntime") is None
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert runtime_available("tensorrt") == INSTALL_HINT
    install(monkeypatch, fake_tensorrt("10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime_available("tensorrt") == "TensorRT is installed but no CUDA GPU is available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime_available("tensorrt") is None
    with pytest.raises(UserError, match="unknown runtime 'tvm'"):
        runtime_available("tvm")


# ----------------------------------------------------------------------------- runner logic


@pytest.fixture
def host_runner(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Let TensorRTRunner run on host memory: skip the CUDA check, use stream handle 0."""
    rec = install(monkeypatch, fake_tensorrt("10.3.0"))
    monkeypatch.setattr(trt_runner_module, "_require_cuda", lambda device: None)
    monkeypatch.setattr(TensorRTRunner, "_stream_handle", lambda self: 0)
    return rec


def test_runner_binds_buffers_and_chunks_large_batches(tmp_path: Path, host_runner: Recorder) -> None:
    engine = build_engine(write_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="fp16")
    runner = TensorRTRunner(engine, device="cpu")
    assert (runner.runtime, runner.precision, runner.batch_range) == ("tensorrt", "fp16", (2, 4))
    assert runner.input_spec.batch is None and runner.input_spec.shape(1)[1:] == IMAGE
    x = torch.rand(10, *IMAGE, generator=torch.Generator().manual_seed(0))
    logits = runner(x)
    flat = x.flatten(1)
    expected = torch.stack([flat.mean(1), flat.amax(1), flat.amin(1)], dim=1)
    assert torch.allclose(logits, expected, atol=1e-6)
    shapes = [call[2][0] for call in named(host_runner, "set_input_shape")]
    assert shapes == [4, 4, 2]  # max batch 4: 10 images run as 4 + 4 + 2
    assert len(named(host_runner, "execute_async_v3")) == 3


def test_runner_rejects_wrong_input(tmp_path: Path, host_runner: Recorder) -> None:
    runner = TensorRTRunner(
        build_engine(write_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"), device="cpu"
    )
    with pytest.raises(InputSpecError, match="smallest batch is 2"):
        runner(torch.rand(1, *IMAGE))
    with pytest.raises(InputSpecError, match="expected shape"):
        runner(torch.rand(2, 1, 16, 16))
    with pytest.raises(InputSpecError, match="float32"):
        runner(torch.rand(2, *IMAGE).double())


def test_corrupt_engine_and_missing_file(tmp_path: Path, host_runner: Recorder) -> None:
    (tmp_path / "bad.engine").write_bytes(b"built elsewhere")
    with pytest.raises(ExportError, match="rebuild it here"):
        TensorRTRunner(tmp_path / "bad.engine", device="cpu")
    with pytest.raises(UserError, match="engine not found"):
        TensorRTRunner(tmp_path / "none.engine", device="cpu")


def test_runner_from_onnx_builds_once_and_rebuilds_when_stale(tmp_path: Path, host_runner: Recorder) -> None:
    onnx_path = write_onnx(tmp_path / "m.onnx")
    runner = build_runner("tensorrt", path=onnx_path, threads=2, device="cpu", max_batch=4)
    assert runner.engine_path == tmp_path / "m.fp32.engine"  # type: ignore[attr-defined]
    tensorrt_runner(onnx_path, device="cpu", max_batch=4)
    assert len(named(host_runner, "build_serialized_network")) == 1  # same key: reused
    stat = onnx_path.stat()
    os.utime(onnx_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    tensorrt_runner(onnx_path, device="cpu", max_batch=4)
    assert len(named(host_runner, "build_serialized_network")) == 1
    tensorrt_runner(onnx_path, device="cpu", max_batch=8)  # another profile: rebuilt
    write_onnx(onnx_path, batch="n")  # new contents: rebuilt
    tensorrt_runner(onnx_path, device="cpu", max_batch=8)
    tensorrt_runner(onnx_path, device="cpu", precision="fp16", max_batch=8)  # another precision
    assert len(named(host_runner, "build_serialized_network")) == 4
    assert json.loads((tmp_path / "m.fp16.engine.json").read_text())["precision"] == "fp16"


def test_runner_needs_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_tensorrt("10.3.0"))
    with pytest.raises(UserError, match="CUDA devices only"):
        TensorRTRunner(tmp_path / "m.engine", device="cpu")


# ----------------------------------------------------------------------------- real TensorRT


def test_real_engine_matches_torch(tmp_path: Path) -> None:
    trt = pytest.importorskip(
        "tensorrt", reason="TensorRT is not installed (pip install robustprune[tensorrt])"
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is available")
    from exporters.onnx import check_parity, export_onnx
    from exporters.torch_runner import TorchRunner
    from tests.test_exporters import SPEC, images, make

    model = make("residual")
    onnx_path = export_onnx(model, tmp_path / "m.onnx", input_spec=SPEC)
    engine = build_engine(onnx_path, tmp_path / "m.engine", min_batch=1, opt_batch=4, max_batch=8)
    runner = TensorRTRunner(engine)
    assert runner.batch_range == (1, 8) and runner.device.startswith("cuda")
    result = check_parity(TorchRunner(model, SPEC), runner, [images(1), images(7), images(12)])
    # TF32 convolutions on Ampere and newer allow ~1e-3 differences from fp32 PyTorch.
    assert result.max_abs_diff < 1e-2 and result.top1_agreement == 1.0, result
    if int(trt.__version__.split(".")[0]) == 10:  # FP16 by builder flag on the same fp32 file
        fp16 = TensorRTRunner(build_engine(onnx_path, tmp_path / "h.engine", precision="fp16", max_batch=8))
        assert fp16.precision == "fp16"
        assert check_parity(TorchRunner(model, SPEC), fp16, [images(8)]).max_abs_diff < 5e-2
