"""TensorRT engines as cached build products, keyed by file, TensorRT, precision, profile, workspace.

An engine is expensive to build and only valid for the TensorRT version and settings it was
built with, so a build is keyed by everything that changes the result: the sha256 of the ONNX
file's bytes (not its modification time: a copied run directory keeps its engines), the
TensorRT version, the precision, the min/opt/max batch profile and the workspace limit. A
request whose key matches the engine's sidecar reuses it; anything else rebuilds.

Precision is never lowered or raised silently: FP32 and FP16 come from the FP32 export, INT8
only from a Q/DQ file (the ``tensorrt`` scheme of :mod:`calibration.qdq`). TensorRT 10 gets
builder flags; TensorRT 11 builds strongly typed networks, so FP16 is built from a float16
copy of the file (:func:`exporters.fp16.convert_to_fp16`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exporters.errors import UserError
from exporters.runtime_spec import RuntimeSpec, register
from exporters.tensorrt import PRECISIONS, build_engine, engine_precision_of_onnx
from exporters.tensorrt_runner import (
    INSTALL_HINT,
    TensorRTRunner,
    import_tensorrt,
    read_engine_sidecar,
    tensorrt_major,
)

__all__ = ["EngineProfile", "EngineRecord", "engine_key", "ensure_engine", "file_sha256", "tensorrt_runner"]


@dataclass(frozen=True)
class EngineProfile:
    """Build settings that change the engine: batch range and workspace."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 1024


@dataclass(frozen=True)
class EngineRecord:
    """One engine: where it is, what it is, and whether this call built it."""

    path: Path
    key: str
    precision: str
    tensorrt_version: str
    source: Path
    built: bool

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(path=self.path.name, source=self.source.name)
        return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def engine_key(onnx_sha256: str, tensorrt_version: str, precision: str, profile: EngineProfile) -> str:
    """The cache key of an engine build (see the module docstring)."""
    payload = {"onnx": onnx_sha256, "tensorrt": tensorrt_version, "precision": precision, **asdict(profile)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ensure_engine(
    onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], precision: str, profile: EngineProfile
) -> EngineRecord:
    """Return an engine for ``onnx_path`` at ``precision``, building it only if its key changed.

    Args:
        onnx_path: the FP32 export (for fp32/fp16) or a Q/DQ file (for int8).
        out_dir: folder for ``<stem>.<precision>.engine`` (+ ``.json`` sidecar, and the
            float16 copy TensorRT 11 builds FP16 from).
        precision: ``fp32``, ``fp16`` or ``int8``.
        profile: batch range and workspace.

    Returns:
        The :class:`EngineRecord`.

    Raises:
        RuntimeUnavailableError: TensorRT is missing or older than 10.
        UserError: unknown precision, or a file that cannot give it (int8 without Q/DQ nodes).
        ExportError: the build failed.
    """
    if precision not in PRECISIONS:
        raise UserError(f"engine precision must be one of {list(PRECISIONS)}, got {precision!r}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    trt = import_tensorrt()
    version, major = str(trt.__version__), tensorrt_major(trt)
    engine = out_dir / f"{onnx_path.stem}.{precision}.engine"
    key = engine_key(file_sha256(onnx_path), version, precision, profile)
    sidecar = read_engine_sidecar(engine)
    if engine.is_file() and sidecar.get("key") == key:
        return EngineRecord(engine, key, precision, version, onnx_path, built=False)
    source = _source_for(onnx_path, out_dir, precision, major)
    build_engine(
        source,
        engine,
        precision=precision,
        workspace_mb=profile.workspace_mb,
        min_batch=profile.min_batch,
        opt_batch=profile.opt_batch,
        max_batch=profile.max_batch,
        extra_sidecar={"key": key, "onnx_sha256": file_sha256(onnx_path), "source_onnx": onnx_path.name},
    )
    return EngineRecord(engine, key, precision, version, onnx_path, built=True)


def _source_for(onnx_path: Path, out_dir: Path, precision: str, major: int) -> Path:
    """The file TensorRT builds from: the given one, or its float16 copy for FP16 on TensorRT 11+."""
    carried = engine_precision_of_onnx(onnx_path)
    if precision == "fp16" and carried == "fp32" and major >= 11:
        from exporters.fp16 import convert_to_fp16

        return convert_to_fp16(onnx_path, out_dir / f"{onnx_path.stem}.fp16.onnx")
    return onnx_path


def tensorrt_runner(
    path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    device: str = "cuda",
    engine_path: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    threads: int | None = None,
    workspace_mb: int = 1024,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
) -> TensorRTRunner:
    """A :class:`~exporters.tensorrt_runner.TensorRTRunner` for an engine, or for an ONNX file.

    Given an ONNX file, the engine ``<stem>.<precision>.engine`` (beside the file, or in the
    folder of ``engine_path``) is built when its cache key changed (file contents, TensorRT
    version, precision, batch profile, workspace: see :mod:`exporters.engine`), or when
    ``rebuild`` is set.

    Args:
        path: a ``.onnx`` file, or an engine built by :func:`build_engine`.
        precision: engine precision when building (an existing engine reports its own).
        device: the CUDA device to run on.
        engine_path: an engine path whose folder keeps the built engine.
        rebuild: build even if an up-to-date engine exists.
        threads: ignored (a GPU runtime); accepted so every runtime takes the same arguments.
        workspace_mb: see :func:`build_engine` (used only when building).
        min_batch: see :func:`build_engine`.
        opt_batch: see :func:`build_engine`.
        max_batch: see :func:`build_engine`.

    Raises:
        RuntimeUnavailableError: TensorRT or CUDA is missing.
        UserError / ExportError: as for :func:`build_engine` and the runner.
    """
    del threads
    path = Path(path)
    if path.suffix != ".onnx":
        return TensorRTRunner(path, device=device)
    if opt_batch is None:
        opt_batch = max(min_batch, min(8, max_batch))
    profile = EngineProfile(min_batch, opt_batch, max_batch, workspace_mb)
    out_dir = Path(engine_path).parent if engine_path else path.parent
    if rebuild:
        target = out_dir / f"{path.stem}.{precision}.engine"
        target.with_name(target.name + ".json").unlink(missing_ok=True)
    record = ensure_engine(path, out_dir, precision, profile)
    return TensorRTRunner(record.path, device=device)


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here (not installed, or no CUDA GPU), or None; never imports
    TensorRT (that loads CUDA libraries)."""
    import torch

    if "tensorrt" in sys.modules:  # already imported (or blocked with None)
        installed = sys.modules["tensorrt"] is not None
    else:  # find_spec looks for the package without importing it
        installed = importlib.util.find_spec("tensorrt") is not None
    if not installed:
        return INSTALL_HINT
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is available"
    return None


register(
    RuntimeSpec(
        "tensorrt",
        tensorrt_runner,
        "engine",
        missing=tensorrt_missing,
        description="TensorRT engines built by the engine stage (NVIDIA GPU)",
    )
)
