"""The engine stage's library: cache keys, FP16 conversion for strongly typed TensorRT, and
ONNX Runtime's GPU providers (their logic, with the fake tensorrt module and stubbed providers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.engine import EngineProfile, engine_key, ensure_engine, file_sha256
from exporters.errors import RuntimeUnavailableError, UserError
from exporters.fp16 import convert_to_fp16
from exporters.onnx import export_onnx, read_onnx_metadata
from exporters.ort_runner import OnnxRuntimeRunner
from exporters.runtimes import build_runner, runtime_available
from exporters.tensorrt import engine_precision_of_onnx, read_engine_sidecar
from tests.test_exporters import SPEC, images, make
from tests.test_tensorrt import fake_tensorrt, install, named, write_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def test_key_changes_with_everything_that_changes_the_engine() -> None:
    base = engine_key("abc", "10.3.0", "fp16", EngineProfile())
    assert base == engine_key("abc", "10.3.0", "fp16", EngineProfile())
    others = [
        engine_key("abd", "10.3.0", "fp16", EngineProfile()),
        engine_key("abc", "10.4.0", "fp16", EngineProfile()),
        engine_key("abc", "10.3.0", "fp32", EngineProfile()),
        engine_key("abc", "10.3.0", "fp16", EngineProfile(max_batch=64)),
        engine_key("abc", "10.3.0", "fp16", EngineProfile(workspace_mb=2048)),
    ]
    assert len({base, *others}) == 6


@pytest.mark.parametrize(
    ("version", "precision", "kind", "source", "flags"),
    [
        ("10.3.0", "fp16", "fp32", "m.onnx", ["FLAG_FP16"]),  # builder flag on the fp32 file
        ("11.1.0", "fp16", "fp32", "m.fp16.onnx", []),  # strongly typed: built from an fp16 copy
        ("11.1.0", "fp32", "fp32", "m.onnx", []),
        ("10.3.0", "int8", "int8", "m.onnx", ["FLAG_INT8"]),  # Q/DQ file + INT8 flag
        ("11.1.0", "int8", "int8", "m.onnx", []),  # Q/DQ file carries it
    ],
)
def test_engine_is_built_from_a_file_that_carries_its_precision(
    version: str, precision: str, kind: str, source: str, flags: list[str], tmp_path: Path, monkeypatch: Any
) -> None:
    rec = install(monkeypatch, fake_tensorrt(version))
    onnx_path = write_onnx(tmp_path / "m.onnx", kind)
    record = ensure_engine(onnx_path, tmp_path / "engines", precision, EngineProfile(max_batch=16))
    assert named(rec, "parse_from_file") == [("parse_from_file", source)]
    assert [c[1] for c in named(rec, "set_flag")] == flags
    assert record.built and record.path.name == f"m.{precision}.engine"
    sidecar = read_engine_sidecar(record.path)
    assert sidecar["key"] == record.key and sidecar["precision"] == precision
    assert sidecar["onnx_sha256"] == file_sha256(onnx_path) and sidecar["max_batch"] == 16
    if source.endswith("fp16.onnx"):
        assert engine_precision_of_onnx(tmp_path / "engines" / source) == "fp16"


def test_same_key_reuses_and_a_changed_file_rebuilds(tmp_path: Path, monkeypatch: Any) -> None:
    rec = install(monkeypatch, fake_tensorrt("10.3.0"))
    onnx_path = write_onnx(tmp_path / "m.onnx")
    first = ensure_engine(onnx_path, tmp_path, "fp32", EngineProfile())
    again = ensure_engine(onnx_path, tmp_path, "fp32", EngineProfile())
    assert (first.built, again.built, again.key) == (True, False, first.key)
    write_onnx(onnx_path, batch="n")  # same name, new bytes
    assert ensure_engine(onnx_path, tmp_path, "fp32", EngineProfile()).built
    install(monkeypatch, fake_tensorrt("10.4.0"))  # a TensorRT upgrade invalidates engines
    assert ensure_engine(onnx_path, tmp_path, "fp32", EngineProfile()).built
    assert len(named(rec, "build_serialized_network")) == 2  # the first fake saw two builds


def test_int8_from_an_fp32_file_is_refused_not_built_at_another_precision(
    tmp_path: Path, monkeypatch: Any
) -> None:
    rec = install(monkeypatch, fake_tensorrt("11.1.0"))
    with pytest.raises(UserError, match="Q/DQ"):
        ensure_engine(write_onnx(tmp_path / "m.onnx"), tmp_path, "int8", EngineProfile())
    with pytest.raises(UserError, match="engine precision must be one of"):
        ensure_engine(write_onnx(tmp_path / "m.onnx"), tmp_path, "int4", EngineProfile())
    assert named(rec, "build_serialized_network") == []


def test_fp16_conversion_keeps_float32_io_and_the_answers(tmp_path: Path) -> None:
    model = make("residual")
    src = export_onnx(model, tmp_path / "m.onnx", input_spec=SPEC, metadata={"model": "pruned"})
    dst = convert_to_fp16(src, tmp_path / "m.fp16.onnx")
    proto = onnx.load(str(dst))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = [i.data_type for i in proto.graph.initializer]
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    meta = read_onnx_metadata(dst)
    assert meta["precision"] == "fp16" and meta["model"] == "pruned" and meta["fp16_clipped"] == "0"
    x = images(8)
    fp32 = OnnxRuntimeRunner(src, threads=1)(x)
    half = OnnxRuntimeRunner(dst, threads=1)(x)
    assert half.dtype == torch.float32
    assert float((fp32 - half).abs().max()) < 1e-2 * float(fp32.abs().max()) + 1e-3
    assert torch.equal(fp32.argmax(1), half.argmax(1))


def test_gpu_providers_absent_say_how_to_get_them(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    path = write_onnx(tmp_path / "m.onnx")
    for runtime in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        assert "pip install onnxruntime-gpu" in str(runtime_available(runtime))
        with pytest.raises(RuntimeUnavailableError, match="onnxruntime-gpu"):
            build_runner(runtime, path=path, threads=1)


def test_gpu_provider_that_does_not_start_is_recorded_as_cpu(tmp_path: Path, monkeypatch: Any) -> None:
    """ONNX Runtime falls back to the CPU when a listed GPU provider cannot start: the runner
    must report what ran, not what was asked for."""
    real = ort.get_available_providers()
    if "CUDAExecutionProvider" in real:
        pytest.skip("CUDA is really there; tests/gpu covers it")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    model = make("plain")
    path = export_onnx(model, tmp_path / "m.onnx", input_spec=SPEC)
    with pytest.warns(UserWarning, match="not in available provider"):  # ONNX Runtime's own words
        runner = build_runner("onnxruntime-cuda", path=path, threads=1)
    assert runner.runtime == "onnxruntime-cuda"
    assert (runner.provider, runner.device) == ("CPUExecutionProvider", "cpu")  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="CUDA devices"):
        build_runner("onnxruntime-cuda", path=path, threads=1, device="cpu")
    x = images(4)
    assert np.allclose(runner(x).numpy(), model(x).detach().numpy(), atol=1e-4)


def test_tensorrt_provider_int8_needs_a_qdq_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(UserError, match="needs a Q/DQ file"):
        build_runner(
            "onnxruntime-tensorrt", path=write_onnx(tmp_path / "m.onnx"), threads=1, precision="int8"
        )


def test_no_tensorrt_module_is_imported_by_the_engine_library() -> None:
    assert (
        "tensorrt" not in sys.modules
        or sys.modules["tensorrt"] is None
        or hasattr(sys.modules["tensorrt"], "rec")
    )  # only ever the fake, installed per test


def test_fp16_conversion_refuses_what_it_would_convert_wrongly(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from exporters.errors import ExportError

    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    graph = helper.make_graph(
        [helper.make_node("Resize", ["pixels", "", "scales"], ["logits"], mode="nearest")],
        "resize",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])],
        [scales],
    )
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="Resize"):
        convert_to_fp16(path, tmp_path / "r.fp16.onnx")
    assert not (tmp_path / "r.fp16.onnx").exists()
