"""The stages after fine-tuning: export, quantize, engine, validate (sharded by model under
torchrun) and bench. Each returns ``(value, artifacts, result)`` for the pipeline to record."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters.base import Runner
from exporters.batching import any_batch
from exporters.latency import compare_latency
from exporters.onnx import check_parity, export_onnx
from exporters.parity import float64_check
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain import deploy, distributed
from toolchain.report.schema import Evaluation
from toolchain.rundir import RunDir, read_json, write_json
from toolchain.stage_context import Context, shared_model

log = logging.getLogger(__name__)


def export_stage(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    """ONNX files of the dense and pruned models, each checked against PyTorch on real images."""
    cfg = ctx.recipe.export
    out = ctx.run.stage_dir("export")
    parity: dict[str, Any] = {}
    artifacts = []
    for name, model in models.items():
        path = out / f"{name}.onnx"
        export_onnx(
            model,
            path,
            input_spec=ctx.input_spec,
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            metadata={
                "class_names": list(ctx.data.class_names),
                "mean": list(ctx.data.mean),
                "std": list(ctx.data.std),
                "recipe_sha256": ctx.recipe.sha256(),
                "model": name,
                "dataset": ctx.data.name,
                "task": ctx.recipe.task,
            },
        )
        runner = build_runner("onnxruntime", path=path, threads=ctx.recipe.validate.threads)
        batch = None if cfg.dynamic_batch else 1
        images = (x for x, _ in ctx.val_loader(batch_size=batch, samples=cfg.parity_samples))
        result = check_parity(TorchRunner(model, ctx.input_spec), runner, images)
        parity[name] = {
            # NaN/Inf logits make the difference infinite; strict JSON records it as null.
            "max_abs_diff": result.max_abs_diff if math.isfinite(result.max_abs_diff) else None,
            "mean_abs_diff": result.mean_abs_diff if math.isfinite(result.mean_abs_diff) else None,
            "top1_agreement": result.top1_agreement,
            "samples": result.samples,
            "reference_max_abs": (
                result.reference_max_abs if math.isfinite(result.reference_max_abs) else None
            ),
            "within_atol": result.max_abs_diff <= cfg.parity_atol,
            **({} if result.ties is None else {"ties": result.ties}),  # per-pixel outputs only
        }
        if result.top1_agreement < 1.0 or not result.max_abs_diff <= cfg.parity_atol:
            log.warning(
                "%s: ONNX Runtime differs from PyTorch (max |dlogit| %.2e, top-1 agreement %.4f)",
                name,
                result.max_abs_diff,
                result.top1_agreement,
            )
            if math.isfinite(result.max_abs_diff):
                # Tell float32 rounding in a badly conditioned model from a wrong export.
                images = (x for x, _ in ctx.val_loader(batch_size=batch, samples=cfg.parity_samples))
                exact = float64_check(model, runner, images)
                parity[name]["float64"] = exact.as_dict()
                log.warning(
                    "%s: against float64, PyTorch float32 is off by %.2e and ONNX Runtime by %.2e",
                    name,
                    exact.torch_fp32_max_abs_diff,
                    exact.engine_max_abs_diff,
                )
        artifacts.append(path.name)
    write_json(out / "parity.json", parity)
    return None, [*artifacts, "parity.json"], {"parity": parity}


def quantize_stage(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    """INT8 Q/DQ copies of the exported files (when ``quantize.enabled``)."""
    out = ctx.run.stage_dir("quantize")
    records: list[dict[str, Any]] = []
    if ctx.recipe.quantize.enabled:
        records = deploy.quantize_models(
            ctx.recipe, models, ctx.run.root / "export", out, lambda: ctx.train_loader(seed_offset=3)
        )
    write_json(out / deploy.QUANTIZE_RECORD, records)
    return None, [*(r["file"] for r in records), deploy.QUANTIZE_RECORD], {"files": records}


def engine_stage(ctx: Context) -> tuple[None, list[str], dict[str, Any]]:
    """TensorRT engines (when a runtime list names ``tensorrt``)."""
    out = ctx.run.stage_dir("engine")
    records: list[dict[str, Any]] = []
    if deploy.engine_stage_needed(ctx.recipe):
        quantized = _stage_records(ctx, "quantize")
        records = deploy.build_engines(
            ctx.recipe, ctx.run.root / "export", ctx.run.root / "quantize", quantized, out
        )
    write_json(out / deploy.ENGINE_RECORD, records)
    return None, [*(r["path"] for r in records), deploy.ENGINE_RECORD], {"engines": records}


def _stage_records(ctx: Context, stage: str) -> list[dict[str, Any]]:
    record = {"quantize": deploy.QUANTIZE_RECORD, "engine": deploy.ENGINE_RECORD}[stage]
    path = ctx.run.root / stage / record
    return list(read_json(path)) if path.is_file() else []


def _labels(ctx: Context, model_name: str, runtimes: list[str]) -> dict[str, dict[str, Any]]:
    return deploy.variant_labels(
        model_name, runtimes, _stage_records(ctx, "quantize"), _stage_records(ctx, "engine")
    )


def onnx_path(run_root: Path, model_name: str) -> Path:
    """Where the export stage writes ``model_name``'s ONNX file."""
    return run_root / "export" / f"{model_name}.onnx"


def _runners(
    ctx: Context, model_name: str, model: nn.Module, runtimes: list[str], threads: int, *, bench: bool = False
) -> dict[str, Runner]:
    runners: dict[str, Runner] = {}
    path = onnx_path(ctx.run.root, model_name)
    for runtime in runtimes:
        if runtime == "torch":
            runners[runtime] = TorchRunner(model, ctx.input_spec)
        elif runtime == "tensorrt":
            continue  # the engine stage's engines, below
        elif runtime == "onnxruntime":
            # Spinning threads help latency but starve interleaved PyTorch work in validation.
            runners[runtime] = build_runner(runtime, path=path, threads=threads, spinning=bench)
        else:
            runners[runtime] = build_runner(runtime, path=path, threads=threads)
    runners.update(
        deploy.variant_runners(
            _labels(ctx, model_name, runtimes),
            quantize_dir=ctx.run.root / "quantize",
            engine_dir=ctx.run.root / "engine",
            threads=threads,
            spinning=bench,
        )
    )
    if not bench:  # the suites feed any batch size; latency is measured at the engine's own
        runners = {key: any_batch(r) for key, r in runners.items()}
    return runners


def validate_stage(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    """The suite on every model and runtime. Under torchrun the models are shared out among the
    ranks (rank r evaluates models r, r + n, ...), each on rank 0's saved model and exported
    files, and rank 0 gathers the evaluations in the single-process order."""
    if not ctx.world.distributed:
        rows = [row for name, model in models.items() for row in _evaluate(ctx, name, model)]
        return _record_evaluations(ctx, rows)
    names = list(models)
    with tempfile.TemporaryDirectory(prefix="robustprune-rank-") as mirror:
        local = ctx if ctx.world.main else replace(ctx, run=RunDir(Path(mirror)))
        _receive_files(local, ["export", "quantize", "engine"])
        shared = {"dense": "train", "pruned": "finetune"}
        mine = {}
        for index, name in enumerate(names):
            model = shared_model(ctx, shared[name])[0]  # every rank takes part in the broadcast
            if index % ctx.world.size == ctx.world.rank:
                log.info("validate: rank %d of %d evaluates %s", ctx.world.rank, ctx.world.size, name)
                mine[name] = [row.to_json() for row in _evaluate(local, name, model)]
        gathered = {name: rows for part in distributed.all_gather(mine) for name, rows in part.items()}
    if not ctx.world.main:
        return None, [], {}
    return _record_evaluations(
        ctx, [Evaluation.model_validate(row) for name in names for row in gathered[name]]
    )


def _evaluate(ctx: Context, name: str, model: nn.Module) -> list[Evaluation]:
    """The suite on one model: PyTorch, its exported file and every variant of it."""
    cfg = ctx.recipe.validate
    runners = _runners(ctx, name, model, list(cfg.runtimes), cfg.threads)
    labels = _labels(ctx, name, list(cfg.runtimes))
    batches = ctx.val_loader(batch_size=cfg.batch_size, samples=cfg.samples)
    rows = ctx.task.evaluate(
        model,
        runners,
        batches,
        cfg,
        model_name=name,
        class_names=ctx.data.class_names,
        progress=ctx.progress,
    )
    int8 = {k: r for k, r in runners.items() if k.startswith("onnxruntime/int8/")}
    parity = deploy.int8_parity(ctx.recipe, model, runners["onnxruntime"], int8, batches) if int8 else {}
    for key, row in zip(runners, rows):
        for field_name, value in labels.get(key, {}).items():
            setattr(row, field_name, value)  # typed fields, or extra keys the schema keeps
        if key in parity:
            row.parity_fp32 = parity[key]
    return rows


def _record_evaluations(ctx: Context, rows: list[Evaluation]) -> tuple[None, list[str], dict[str, Any]]:
    write_json(ctx.run.stage_dir("validate") / "evaluations.json", [e.to_json() for e in rows])
    return None, ["evaluations.json"], {"count": len(rows)}


def _receive_files(ctx: Context, stages: list[str]) -> None:
    """Copy rank 0's files of ``stages`` into this rank's run folder (a no-op on rank 0),
    so no node needs a shared disk."""
    files = None
    if ctx.world.main:
        files = {
            str(path.relative_to(ctx.run.root)): path.read_bytes()
            for stage in stages
            for path in sorted((ctx.run.root / stage).glob("*"))
            if path.is_file() and not path.name.startswith(".")
        }
    files = distributed.broadcast(files)
    if ctx.world.main:
        return
    for relative, content in files.items():
        target = ctx.run.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def bench_stage(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    """Latency of every model, runtime and variant, interleaved per runtime (rank 0 only)."""
    cfg = ctx.recipe.bench
    rows: list[dict[str, Any]] = []
    if cfg.enabled:
        by_model = {
            name: _runners(ctx, name, m, list(cfg.runtimes), cfg.threads, bench=True)
            for name, m in models.items()
        }
        labels = {name: _labels(ctx, name, list(cfg.runtimes)) for name in models}
        # Torch is timed with the recipe's thread count, and rows say the count each runtime had.
        torch_threads = torch.get_num_threads()
        if "torch" in cfg.runtimes:
            torch.set_num_threads(cfg.threads)
        try:
            for runtime in cfg.runtimes:
                # Every model and variant of one runtime is timed interleaved, so ratios are not
                # skewed by drift.
                runners = {
                    f"{name}:{key}": runner
                    for name, group in by_model.items()
                    for key, runner in group.items()
                    if key.split("/")[0] == runtime
                }
                for batch in _bench_batches(runtime, runners, cfg.batch_sizes):
                    stats = compare_latency(
                        runners, batch=batch, warmup=cfg.warmup, iterations=cfg.iterations
                    )
                    for full_key, runner in runners.items():
                        name, _, key = full_key.partition(":")
                        rows.append(
                            {
                                "model": name,
                                "runtime": runner.runtime,
                                "precision": runner.precision,
                                "device": runner.device,
                                "provider": getattr(runner, "provider", None),
                                **{k: v for k, v in labels[name].get(key, {}).items() if k != "precision"},
                                "batch": batch,
                                "threads": _threads_of(runner),
                                **stats[full_key],
                            }
                        )
        finally:
            torch.set_num_threads(torch_threads)
    write_json(ctx.run.stage_dir("bench") / "latency.json", rows)
    return None, ["latency.json"], {"rows": len(rows)}


def _bench_batches(runtime: str, runners: dict[str, Runner], batch_sizes: list[int]) -> list[int]:
    fixed = {r.input_spec.batch for r in runners.values() if r.input_spec.batch is not None}
    if fixed and set(batch_sizes) != fixed:
        log.warning("%s engines have a fixed batch of %s: latency measured at that size only", runtime, fixed)
    return sorted(b for b in fixed if b is not None) if fixed else list(batch_sizes)


def _threads_of(runner: Runner) -> int | None:
    """The CPU threads a runner computes with: its session's intra-op count, torch's own count
    for a PyTorch model on the CPU, none for a GPU engine."""
    if runner.device != "cpu":
        return None
    if runner.runtime == "torch":
        return torch.get_num_threads()
    return getattr(runner, "threads", None)
