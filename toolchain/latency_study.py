"""``robustprune bench``: dense FP32, pruned FP32 at several budgets and pruned INT8, side by side.

The question it answers: does the MACs reduction pruning promises show up as latency, and what
does INT8 add on top? Every model is timed in one interleaved run (drift hits all alike), at
each batch size, on ONNX Runtime's CPU provider with the thread count pinned and recorded.
Weights do not change latency, so models are built from random initialisation and pruned by
weight magnitude (no data or training needed); INT8 is calibrated on random pixels for the
same reason (accuracy is measured elsewhere, on a trained model).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.fusion import count_fused_kernels
from calibration.qdq import quantize_onnx
from exporters.base import InputSpec, Runner
from exporters.latency import compare_latency
from exporters.onnx import export_onnx
from exporters.ort_runner import OnnxRuntimeRunner
from toolchain.errors import UserError
from toolchain.machine import OtherLoad, cpu_flags
from toolchain.models import build_model
from toolchain.pruning import count_macs_params, prune_to_target

__all__ = ["LatencyStudy", "render_latency_study", "run_latency_study", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStudy:
    """What to time.

    Attributes:
        arch: a zoo architecture (``resnet18``, ``mobilenetv2``, ...).
        image_size, num_classes, width: the model's input size, classes and width multiplier.
        reductions: MACs reduction targets of the pruned FP32 models.
        int8_reductions: which of those are also quantised (one row per INT8 scheme).
        int8_schemes: INT8 schemes to time (``u8s8``, ``s8s8``).
        batches: batch sizes.
        threads: ONNX Runtime intra-op threads (inter-op is 1); the process is pinned to as
            many CPUs.
        round_to: channel counts kept multiples of this (None: unrounded).
        optimization: ONNX Runtime graph optimisation level.
        iterations: timed calls per model at batch 1; larger batches get proportionally fewer,
            never below ``min_iterations``.
        min_iterations: floor on timed calls (200 keeps p99 below the maximum).
        warmup, rounds: untimed calls per model; interleaving rounds.
        seed: model initialisation.
        criterion: ``magnitude`` or ``random`` (criteria that need no data).
    """

    arch: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    width: float = 1.0
    reductions: tuple[float, ...] = (2.0, 4.0, 8.0)
    int8_reductions: tuple[float, ...] = (4.0,)
    int8_schemes: tuple[str, ...] = ("u8s8", "s8s8")
    batches: tuple[int, ...] = (1, 32)
    threads: int = 2
    round_to: int | None = 16
    optimization: str = "all"
    iterations: int = 600
    min_iterations: int = 200
    warmup: int = 20
    rounds: int = 10
    seed: int = 0
    criterion: str = "magnitude"

    def check(self) -> None:
        """Raise :class:`UserError` on settings that cannot give a meaningful table."""
        if not self.reductions or any(r <= 1 for r in self.reductions):
            raise UserError(f"reductions must be > 1, got {list(self.reductions)}")
        missing = [r for r in self.int8_reductions if r not in self.reductions]
        if missing:
            raise UserError(
                f"int8 reductions {missing} are not among the pruned reductions {list(self.reductions)}"
            )
        if not self.batches or min(self.batches) < 1 or self.threads < 1:
            raise UserError("batches and threads must be >= 1")
        if self.criterion not in ("magnitude", "random"):
            raise UserError(
                "the latency study prunes untrained models: criterion must be magnitude or random, "
                f"got {self.criterion!r}"
            )
        if self.min_iterations < 1 or self.iterations < 1 or self.rounds < 1:
            raise UserError("iterations, min_iterations and rounds must be >= 1")


def _label(reduction: float | None, precision: str = "fp32", scheme: str | None = None) -> str:
    base = "dense" if reduction is None else f"pruned-{reduction:g}x"
    return base if precision == "fp32" else f"{base}-{precision}-{scheme}"


def _pin(threads: int) -> list[int]:
    """Pin this process to ``threads`` CPUs (where the OS allows it); return the CPU list."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:threads]
    if len(chosen) < threads:
        log.warning("asked for %d threads but only %d CPUs are available", threads, len(allowed))
    os.sched_setaffinity(0, chosen)
    return chosen


def _models(study: LatencyStudy, spec: InputSpec) -> dict[str, tuple[nn.Module, float | None]]:
    torch.manual_seed(study.seed)
    dense = build_model(
        study.arch,
        num_classes=study.num_classes,
        in_channels=spec.channels,
        mean=[0.5] * spec.channels,
        std=[0.25] * spec.channels,
        image_size=study.image_size,
        width=study.width,
    ).eval()
    example = torch.zeros(spec.shape(1))
    models: dict[str, tuple[nn.Module, float | None]] = {"dense": (dense, None)}
    for reduction in study.reductions:
        pruned = copy.deepcopy(dense)
        prune_to_target(
            pruned,
            example_inputs=example,
            criterion=study.criterion,
            macs_reduction=reduction,
            steps=1,
            round_to=study.round_to,
            progress=False,
        )
        models[_label(reduction)] = (pruned.eval(), reduction)
    return models


def run_latency_study(study: LatencyStudy, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Build, prune, export, quantise and time every model of ``study``.

    Args:
        study: the settings.
        work_dir: where the ONNX files go (default: a temporary folder, removed afterwards).

    Returns:
        ``{"settings", "environment", "models": [...], "rows": [...], "summary"}``; each row has
        the model label, precision, scheme, batch, p50/p90/p99/mean/max in ms, the number of
        timed calls, throughput, and speed-ups against dense FP32 and (INT8) against the same
        pruned model in FP32. See the README's latency table.

    Raises:
        UserError: bad settings, or an unknown architecture or scheme.
    """
    study.check()
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="robustprune-bench-") as tmp:
            return run_latency_study(study, tmp)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    torch_threads = torch.get_num_threads()
    try:
        return _run(study, Path(work_dir))
    finally:  # the pinning is for the measurement only
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(torch_threads)


def _run(study: LatencyStudy, work: Path) -> dict[str, Any]:
    cpus = _pin(study.threads)
    torch.set_num_threads(study.threads)
    spec = InputSpec(3, study.image_size, study.image_size)
    example = torch.zeros(spec.shape(1))
    models_info: list[dict[str, Any]] = []
    runners: dict[str, Runner] = {}
    dense_macs = 0
    for label, (model, reduction) in _models(study, spec).items():
        macs, params = count_macs_params(model, example)
        dense_macs = dense_macs or macs
        path = export_onnx(model, work / f"{label}.onnx", input_spec=spec, metadata={"model": label})
        models_info.append(_info(label, reduction, "fp32", None, macs, params, dense_macs, None))
        runners[label] = _runner(path, study)
        if reduction in study.int8_reductions:
            calibration = np.random.default_rng(study.seed).random((64, *spec.shape(1)[1:]), dtype=np.float32)
            for scheme in study.int8_schemes:
                name = _label(reduction, "int8", scheme)
                qpath = quantize_onnx(path, work / f"{name}.onnx", calibration, scheme=scheme).path
                fusion = count_fused_kernels(qpath, threads=study.threads)
                fusion.pop("optimized_ops")
                models_info.append(_info(name, reduction, "int8", scheme, macs, params, dense_macs, fusion))
                runners[name] = _runner(qpath, study)
    rows = []
    for batch in study.batches:
        iterations = max(study.min_iterations, study.iterations // batch)
        log.info("timing %d models at batch %d, %d calls each", len(runners), batch, iterations)
        load = OtherLoad()
        stats = compare_latency(
            runners, batch=batch, warmup=study.warmup, iterations=iterations, rounds=study.rounds
        )
        other = load.share()
        if other is not None and other > 0.05:
            log.warning(
                "other processes used %.0f%% of the CPUs during the batch-%d timings", 100 * other, batch
            )
        rows += [{**row, "other_cpu_share": other} for row in _rows(stats, runners, models_info, batch)]
    return {
        "benchmark": "latency",
        "settings": dict(study.__dict__),
        "environment": _environment(study, cpus, runners),
        "models": models_info,
        "rows": rows,
        "summary": summarize(rows, models_info),
    }


def _runner(path: Path, study: LatencyStudy) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(
        path,
        threads=study.threads,
        spinning=True,
        optimization=study.optimization,
        providers=["CPUExecutionProvider"],
    )


def _info(
    label: str,
    reduction: float | None,
    precision: str,
    scheme: str | None,
    macs: int,
    params: int,
    dense_macs: int,
    fusion: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "model": label,
        "target_reduction": reduction,
        "precision": precision,
        "scheme": scheme,
        "macs": macs,
        "params": params,
        "macs_reduction": dense_macs / macs,
        "fusion": fusion,
    }


def _rows(
    stats: dict[str, dict[str, float | int]],
    runners: dict[str, Runner],
    models: Sequence[dict[str, Any]],
    batch: int,
) -> list[dict[str, Any]]:
    info = {m["model"]: m for m in models}
    dense = float(stats["dense"]["p50_ms"])
    rows = []
    for label, s in stats.items():
        m, runner = info[label], runners[label]
        fp32_label = _label(m["target_reduction"]) if m["precision"] == "int8" else label
        rows.append(
            {
                "model": label,
                "precision": m["precision"],
                "scheme": m["scheme"],
                "runtime": runner.runtime,
                "device": runner.device,
                "provider": getattr(runner, "provider", None),
                "batch": batch,
                **s,
                "speedup_vs_dense": dense / float(s["p50_ms"]),
                "speedup_vs_fp32": float(stats[fp32_label]["p50_ms"]) / float(s["p50_ms"]),
                "macs_reduction": m["macs_reduction"],
            }
        )
    return rows


def summarize(rows: Sequence[dict[str, Any]], models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, read off the rows.

    ``fp32_efficiency`` is speed-up / MACs reduction per pruned FP32 model and batch (target
    >= 0.9); ``int8_vs_fp32`` the INT8 speed-up over the same pruned model in FP32 per scheme
    and batch (target >= 2.5 at batch 32, CPU scheme); ``end_to_end`` dense FP32 -> pruned INT8
    per scheme and batch (aim >= 12 at 4x); ``fastest_scheme`` the INT8 scheme with the lowest
    p50 at the largest batch.
    """
    out: dict[str, Any] = {"fp32_efficiency": {}, "int8_vs_fp32": {}, "end_to_end": {}}
    for row in rows:
        key = f"{row['model']}@{row['batch']}"
        if row["model"] == "dense":
            continue
        if row["precision"] == "fp32":
            out["fp32_efficiency"][key] = row["speedup_vs_dense"] / row["macs_reduction"]
        else:
            out["int8_vs_fp32"][key] = row["speedup_vs_fp32"]
            out["end_to_end"][key] = row["speedup_vs_dense"]
    int8 = [r for r in rows if r["precision"] == "int8"]
    if int8:
        largest = max(r["batch"] for r in int8)
        fastest = min((r for r in int8 if r["batch"] == largest), key=lambda r: r["p50_ms"])
        out["fastest_scheme"] = fastest["scheme"]
        out["fused"] = {m["model"]: m["fusion"] for m in models if m["fusion"]}
    return out


def _environment(study: LatencyStudy, cpus: list[int], runners: dict[str, Runner]) -> dict[str, Any]:
    import onnxruntime as ort

    providers = sorted({getattr(r, "provider", "?") for r in runners.values()})
    flags = cpu_flags()
    return {
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "device": "cpu",
        "providers": providers,
        "intra_op_threads": study.threads,
        "inter_op_threads": 1,
        "spinning": True,
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": cpus,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
        "avx512f": "avx512f" in flags,
    }


def render_latency_study(result: dict[str, Any]) -> str:
    """The study as a Markdown table (the README's latency table is this output)."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"{settings['arch']} at {settings['image_size']} px, ONNX Runtime {env['onnxruntime']} "
        f"({', '.join(env['providers'])}), {env['intra_op_threads']} intra-op threads pinned to CPUs "
        f"{env['cpu_affinity']}, round_to={settings['round_to']}, optimization={settings['optimization']}",
        "",
        "| model | precision | MACs reduction | batch | p50 ms | p90 ms | p99 ms | calls "
        "| vs dense | vs own FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        precision = r["precision"] if r["scheme"] is None else f"{r['precision']} {r['scheme']}"
        lines.append(
            f"| {r['model']} | {precision} | {r['macs_reduction']:.2f}x | {r['batch']} | {r['p50_ms']:.3f} | "
            f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['samples']} | {r['speedup_vs_dense']:.2f}x | "
            f"{r['speedup_vs_fp32']:.2f}x |"
        )
    fused = result["summary"].get("fused", {})
    for model, counts in fused.items():
        lines.append(
            f"\n{model}: {counts['integer_conv']} of {counts['conv_nodes']} convolutions "
            "fused into integer kernels"
        )
    return "\n".join(lines)
