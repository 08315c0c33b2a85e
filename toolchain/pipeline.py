"""The pipeline: recipe → data+model → train → prune → fine-tune → export → quantize → engine →
validate → bench → report.

Each stage writes its artifacts into the run directory with a key chained from the recipe
sections it depends on; a stage whose key did not change is loaded instead of re-run, so an
interrupted run resumes, and editing ``finetune`` re-runs fine-tuning and what follows only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.bn import recalibrate_bn
from exporters.base import InputSpec, Runner
from exporters.batching import any_batch
from exporters.latency import compare_latency
from exporters.onnx import check_parity, export_onnx
from exporters.runtimes import build_runner
from exporters.torch_runner import TorchRunner
from toolchain import deploy, preflight
from toolchain.data import DataBundle
from toolchain.device import resolve_device
from toolchain.models import trusted_builder
from toolchain.preflight import prune_job
from toolchain.pruning import count_macs_params, load_pruned, prune_model, save_pruned
from toolchain.pruning.latency_target import resolve_latency_budget, verify
from toolchain.recipe import Recipe
from toolchain.report.assemble import assemble_report
from toolchain.report.schema import Evaluation, Report
from toolchain.report.writer import mark_stale, write_report
from toolchain.rundir import RunDir, atomic_path, chain_key, read_json, write_json
from toolchain.tasks import DEFAULT_TASK, Task, task_named
from toolchain.training import TrainCheckpoint, make_loader, train_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


@dataclass
class Context:
    """What every stage needs: the recipe, the run folder, the data and a progress switch."""

    recipe: Recipe
    run: RunDir
    data: DataBundle
    progress: bool = True
    keys: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def example_inputs(self) -> torch.Tensor:
        return torch.zeros(1, self.data.channels, *self.data.input_hw)

    @property
    def input_spec(self) -> InputSpec:
        height, width = self.data.input_hw
        return InputSpec(self.data.channels, height, width, None if self.recipe.export.dynamic_batch else 1)

    @property
    def task(self) -> Task:
        return task_named(self.recipe.task)

    def train_loader(self, seed_offset: int = 0) -> torch.utils.data.DataLoader:
        d = self.recipe.data
        return make_loader(
            self.data.train,
            d.batch_size,
            shuffle=True,
            seed=self.recipe.seed + seed_offset,
            num_workers=d.num_workers,
        )

    def val_loader(
        self, batch_size: int | None = None, samples: int | None = None
    ) -> torch.utils.data.DataLoader:
        dataset = self.data.val
        if samples is not None and samples < len(dataset):  # type: ignore[arg-type]
            dataset = torch.utils.data.Subset(dataset, range(samples))
        return make_loader(dataset, batch_size or self.recipe.data.batch_size, shuffle=False)


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's cache key: its own recipe sections chained onto its upstream stage's key."""
    # The task joins the key only when set, so classification runs keep their cached stages.
    task = ("task",) if recipe.task != DEFAULT_TASK else ()
    keys = {"train": chain_key(recipe.section_hash(*task, "data", "model", "train"))}
    keys["prune"] = chain_key(keys["train"], recipe.section_hash("prune"))
    keys["finetune"] = chain_key(keys["prune"], recipe.section_hash("finetune"))
    keys["export"] = chain_key(keys["finetune"], recipe.section_hash("export"))
    keys["quantize"] = chain_key(keys["export"], recipe.section_hash("quantize"))
    # An engine is only valid for the TensorRT that built it: a copied run directory rebuilds.
    trt = deploy.tensorrt_version() or "none"
    keys["engine"] = chain_key(keys["quantize"], recipe.section_hash("engine"), f"tensorrt={trt}")
    keys["validate"] = chain_key(keys["engine"], recipe.section_hash("validate"))
    keys["bench"] = chain_key(keys["engine"], recipe.section_hash("bench"))
    return keys


def run_pipeline(recipe: Recipe, out: str | Path | None = None, *, progress: bool = True) -> Report:
    """Run (or resume) every stage of ``recipe`` and write the report.

    Args:
        recipe: a validated recipe.
        out: the run directory; default ``runs/<recipe.name>``.
        progress: show progress bars (they switch themselves off when stderr is not a terminal,
            so CI logs keep only the per-epoch and per-stage lines).

    Returns:
        The report (also written to ``<out>/report.json``, last, with status ``completed``;
        the previous report is marked stale before the first stage runs).

    Raises:
        UserError: bad names, missing data or checkpoints, or an unusable run directory; raised
            before anything is written.
    """
    data = preflight.check(recipe)
    run = RunDir.open(out or Path("runs") / recipe.name, recipe.model_dump(mode="json"))
    mark_stale(run.root)
    ctx = Context(
        recipe=recipe,
        run=run,
        data=data,
        progress=progress,
        keys=stage_keys(recipe),
        device=resolve_device(recipe.device),
    )
    torch.manual_seed(recipe.seed)

    dense = _stage(ctx, "train", lambda: _train(ctx), lambda: _load_model(ctx, "train"))
    _stage(ctx, "prune", lambda: _prune(ctx), lambda: None)
    pruned = _stage(ctx, "finetune", lambda: _finetune(ctx), lambda: _load_model(ctx, "finetune"))
    models = {"dense": dense, "pruned": pruned}
    _stage(ctx, "export", lambda: _export(ctx, models), lambda: None)
    _stage(ctx, "quantize", lambda: _quantize(ctx, models), lambda: None)
    _stage(ctx, "engine", lambda: _engine(ctx), lambda: None)
    _stage(ctx, "validate", lambda: _validate(ctx, models), lambda: None)
    _stage(ctx, "bench", lambda: _bench(ctx, models), lambda: None)

    report = assemble_report(ctx.run.root, recipe, data_name=data.name, example_inputs=ctx.example_inputs)
    write_report(ctx.run.root, report)
    return report


def _stage(ctx: Context, name: str, compute: Callable[[], Any], load: Callable[[], Any]) -> Any:
    key = ctx.keys[name]
    if ctx.run.finished(name, key) is not None:
        log.info("stage %-8s up to date, skipped", name)
        return load()
    log.info("stage %-8s running", name)
    start = time.perf_counter()
    value, artifacts, result = compute()
    ctx.run.finish(name, key, artifacts, result, time.perf_counter() - start)
    log.info("stage %-8s done in %.1f s", name, time.perf_counter() - start)
    return value


# --- stages -----------------------------------------------------------------------------------


def _save_model(
    ctx: Context, stage: str, model: nn.Module, history: list[Any], structure: list[Any] | None = None
) -> None:
    path = ctx.run.stage_dir(stage) / MODEL_FILE
    with atomic_path(path) as tmp:
        save_pruned(
            tmp,
            spec=model.spec,  # type: ignore[arg-type]
            history=history,
            state_dict=model.state_dict(),
            structure=structure,
        )


def _load_model(ctx: Context, stage: str) -> nn.Module:
    return _load_with_history(ctx, stage)[0]


def _load_with_history(ctx: Context, stage: str) -> tuple[nn.Module, dict[str, Any]]:
    """The stage's model and what rebuilds its shape (``history``, ``structure``)."""
    model, info = load_pruned(
        ctx.run.root / stage / MODEL_FILE, trusted_builder(ctx.recipe), ctx.example_inputs
    )
    return model.eval(), info


CHECKPOINT_FILE = ".checkpoint.pt"


def _checkpoint(ctx: Context, stage: str) -> TrainCheckpoint:
    """A stage's per-epoch training checkpoint; only a run with the same stage key resumes from it."""
    return TrainCheckpoint(ctx.run.root / stage / CHECKPOINT_FILE, ctx.keys[stage])


def _train(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    torch.manual_seed(ctx.recipe.seed)
    model = preflight.recipe_model(ctx.recipe, ctx.data)
    history = train_model(
        model,
        ctx.train_loader(),
        ctx.recipe.train,
        seed=ctx.recipe.seed,
        desc="train",
        progress=ctx.progress,
        device=ctx.device,
        checkpoint=_checkpoint(ctx, "train"),
    )
    model.cpu()
    macs, params = count_macs_params(model, ctx.example_inputs)
    _save_model(ctx, "train", model, [])
    return model, [MODEL_FILE], {"epochs": history, "macs": macs, "params": params}


def _prune(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    cfg = ctx.recipe.prune
    # A fresh copy from disk: the dense model in memory stays intact for validation.
    model = _load_model(ctx, "train")
    job = prune_job(ctx.recipe, model, ctx.example_inputs, ctx.train_loader, ctx.progress)
    job.checkpoint = _checkpoint(ctx, "prune")
    job.device = ctx.device  # methods train there; pruning itself works on the CPU copy
    latency: dict[str, Any] | None = None
    if cfg.target.latency_reduction is None:
        result = prune_model(model, job, cfg)
    else:
        with tempfile.TemporaryDirectory(prefix="robustprune-latency-") as tmp:
            job.budget, search, meter = resolve_latency_budget(
                model,
                job.budget,
                cfg.target.latency,
                ctx.input_spec,
                ctx.example_inputs,
                job.ignored_layers,
                Path(tmp),
            )
            result = prune_model(model, job, cfg)
            latency = verify(result.model, result.macs_reduction, search, meter)
        result.target_met = latency["measured_reduction"] >= cfg.target.reduction * (1 - cfg.tolerance)
    if cfg.bn_recalibration_batches:
        recalibrate_bn(result.model, ctx.train_loader(seed_offset=1), batches=cfg.bn_recalibration_batches)
    _save_model(ctx, "prune", result.model, result.history, result.structure)
    summary = {
        "method": result.method,
        "target": cfg.target.as_dict(),
        "tolerance": cfg.tolerance,
        "target_met": result.target_met,
        "dense_macs": result.dense_macs,
        "dense_params": result.dense_params,
        "macs": result.macs,
        "params": result.params,
        "macs_reduction": result.macs_reduction,
        "params_reduction": result.params_reduction,
        "steps": result.steps,
        "info": result.info,
        "trace": result.trace,
        "structure": result.structure,
    }
    if latency is not None:
        summary["latency"] = latency
    return result.model, [MODEL_FILE], summary


def _finetune(ctx: Context) -> tuple[nn.Module, list[str], dict[str, Any]]:
    model, shape = _load_with_history(ctx, "prune")
    history = train_model(
        model,
        ctx.train_loader(seed_offset=2),
        ctx.recipe.finetune,
        seed=ctx.recipe.seed + 100,
        desc="finetune",
        progress=ctx.progress,
        device=ctx.device,
        checkpoint=_checkpoint(ctx, "finetune"),
    )
    model.cpu()
    macs, params = count_macs_params(model, ctx.example_inputs)
    _save_model(ctx, "finetune", model, shape["history"], shape["structure"])
    return model, [MODEL_FILE], {"epochs": history, "macs": macs, "params": params}


def _export(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
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
            "within_atol": result.max_abs_diff <= cfg.parity_atol,
            **({} if result.ties is None else {"ties": result.ties}),  # per-pixel outputs only
        }
        if result.top1_agreement < 1.0 or result.max_abs_diff > cfg.parity_atol:
            log.warning(
                "%s: ONNX Runtime differs from PyTorch (max |dlogit| %.2e, top-1 agreement %.4f)",
                name,
                result.max_abs_diff,
                result.top1_agreement,
            )
        artifacts.append(path.name)
    write_json(out / "parity.json", parity)
    return None, [*artifacts, "parity.json"], {"parity": parity}


def _quantize(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    out = ctx.run.stage_dir("quantize")
    records: list[dict[str, Any]] = []
    if ctx.recipe.quantize.enabled:
        records = deploy.quantize_models(
            ctx.recipe, models, ctx.run.root / "export", out, lambda: ctx.train_loader(seed_offset=3)
        )
    write_json(out / deploy.QUANTIZE_RECORD, records)
    return None, [*(r["file"] for r in records), deploy.QUANTIZE_RECORD], {"files": records}


def _engine(ctx: Context) -> tuple[None, list[str], dict[str, Any]]:
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


def _validate(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
    cfg = ctx.recipe.validate
    evaluations: list[Evaluation] = []
    for name, model in models.items():
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
        evaluations += rows
    write_json(ctx.run.stage_dir("validate") / "evaluations.json", [e.to_json() for e in evaluations])
    return None, ["evaluations.json"], {"count": len(evaluations)}


def _bench(ctx: Context, models: dict[str, nn.Module]) -> tuple[None, list[str], dict[str, Any]]:
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
