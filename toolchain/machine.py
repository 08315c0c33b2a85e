"""What this machine offers: CPU instruction sets, ONNX Runtime providers, torch/CUDA, TensorRT.

Read-only probes, cheap and safe to call before any work: nothing here initialises CUDA
(``torch.cuda.is_available`` only asks the driver) or imports TensorRT (its version is read
from the installed package's metadata).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = [
    "INT8_FLAGS",
    "OtherLoad",
    "cpu_flags",
    "cpu_int8_support",
    "package_version",
    "probe",
    "tensorrt_version",
]

# CPU flags (Linux /proc/cpuinfo names) of instructions that make INT8 convolutions fast.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty if unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key = line.partition(":")[0].strip().lower()
        if key in ("flags", "features"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_int8_support(flags: set[str]) -> dict[str, Any]:
    """INT8 dot-product instructions present, and what that means for ONNX Runtime's CPU INT8."""
    found = [f for f in INT8_FLAGS if f in flags]
    return {
        "int8_instructions": found,
        "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")),
        "avx512": "avx512f" in flags,
        # ONNX Runtime's NCHWc layout blocks channels by the vector width: 16 floats on
        # AVX-512, 8 on AVX2; pruned channel counts that are multiples of it keep that layout.
        "nchwc_block": 16 if "avx512f" in flags else 8 if "avx2" in flags else None,
    }


def package_version(name: str) -> str | None:
    """An installed distribution's version from its metadata (never imports it)."""
    for candidate in (name, name.replace("-", "_")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def tensorrt_version() -> str | None:
    """The installed TensorRT's version from package metadata (the import would load CUDA)."""
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        version = package_version(name)
        if version:
            return version
    return None


def probe() -> dict[str, Any]:
    """Everything ``robustprune doctor`` prints, as a dict."""
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    tensorrt = (
        package_version("tensorrt") or package_version("tensorrt-cu12") or package_version("tensorrt-cu13")
    )
    flags = cpu_flags()
    return {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": gpus,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": tensorrt,
        "tensorrt_importable": importlib.util.find_spec("tensorrt") is not None,
        "trtexec": shutil.which("trtexec"),
        "cpu": {**cpu_int8_support(flags), "threads_available": torch.get_num_threads()},
    }


class OtherLoad:
    """How much CPU *other* processes used while a measurement ran (Linux ``/proc/stat``).

    Timings on a shared machine are only worth reporting when nothing else competed for the
    cores: ``share()`` is other processes' busy CPU time divided by the wall time times the
    CPU count (0.0 = the machine was ours alone, 1.0 = every core was busy elsewhere); None
    where ``/proc/stat`` is unreadable.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        jiffies = [int(v) for v in fields]
        idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)
        busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        cpus = os.cpu_count() or 1
        return max(0.0, busy - own) / (wall * cpus) if wall > 0 else None
