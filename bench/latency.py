"""Latency that tracks MACs, and INT8 that keeps accuracy: the README's latency tables, as JSON.

    flock /tmp/cpu.lock python bench/latency.py [--out bench/results/latency.json]
        [--skip-accuracy] [--epochs 8] [--methods minmax,percentile,entropy] [--model-cache FILE]

Part 1 (speed, ``robustprune bench`` on each model): dense FP32, magnitude-pruned FP32 at 2x,
4x and 8x fewer MACs and the 4x model in INT8 (both schemes), at batch 1 and 32, ONNX Runtime
CPU with 2 pinned intra-op threads; CIFAR ResNet-18 and MobileNetV2 at 32 px, with channel
counts rounded to 16 (the fix) and, for comparison, unrounded.

Part 2 (knobs, MobileNetV2 dense vs 4x pruned FP32): ONNX Runtime's graph optimisation level
(basic / extended / all, which adds the NCHWc layout), channel rounding (none / 8 / 16) and
intra-op threads (1 / 2), to find where batch 1 loses the MACs gain.

Part 3 (accuracy of the CPU INT8 scheme, needs a trained model): the 4x ResNet-18 (magnitude,
round_to 16) trained briefly with single-step PGD-AT on the procedural ``signs`` data (32 px,
``--epochs`` epochs over 4,000 images), exported, quantised with the CPU scheme on clean-only
and on mixed (clean/corrupted/adversarial) calibration with each calibration method, and
validated on ONNX Runtime FP32 and INT8: clean, PGD-10 transfer, corruptions, and
INT8-vs-FP32 parity.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_latency")


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from toolchain.latency_study import LatencyStudy, render_latency_study, run_latency_study

    studies = []
    for arch in ("resnet18", "mobilenetv2"):
        for round_to in (16, None):
            study = LatencyStudy(arch=arch, round_to=round_to, iterations=args.iterations)
            load = os.getloadavg()
            result = run_latency_study(study)
            result["environment"]["loadavg_before_after"] = [load[0], os.getloadavg()[0]]
            sys.stdout.write(render_latency_study(result) + "\n\n")
            studies.append(result)
    return studies


def knobs(args: argparse.Namespace, arch: str = "mobilenetv2") -> list[dict[str, Any]]:
    """Where batch 1 loses the MACs gain: graph optimisation level x channel rounding x threads,
    dense vs 4x pruned FP32 only (one interleaved run per setting)."""
    from toolchain.latency_study import LatencyStudy, run_latency_study

    out = []
    for optimization in ("basic", "extended", "all"):
        for round_to in (None, 8, 16):
            for threads in (1, 2):
                if threads == 1 and (optimization != "all" or round_to == 8):
                    continue
                study = LatencyStudy(
                    arch=arch,
                    reductions=(4.0,),
                    int8_reductions=(),
                    round_to=round_to,
                    optimization=optimization,
                    threads=threads,
                    iterations=args.knob_iterations,
                    min_iterations=100,
                )
                result = run_latency_study(study)
                summary = {
                    f"batch_{r['batch']}": {"p50_ms": r["p50_ms"], "speedup": r["speedup_vs_dense"]}
                    for r in result["rows"]
                    if r["model"] == "pruned-4x"
                }
                dense = {f"batch_{r['batch']}": r["p50_ms"] for r in result["rows"] if r["model"] == "dense"}
                macs = next(m["macs_reduction"] for m in result["models"] if m["model"] == "pruned-4x")
                row = {
                    "arch": arch,
                    "optimization": optimization,
                    "round_to": round_to,
                    "threads": threads,
                    "macs_reduction": macs,
                    "dense_p50_ms": dense,
                    "pruned": summary,
                    "other_cpu_share": max(r["other_cpu_share"] or 0.0 for r in result["rows"]),
                }
                log.info("knobs %s", row)
                out.append(row)
    return out


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from calibration.data import CalibrationMix, build_calibration_set
    from calibration.parity import compare_precisions
    from calibration.qdq import quantize_onnx
    from exporters.base import InputSpec
    from exporters.onnx import export_onnx
    from exporters.ort_runner import OnnxRuntimeRunner
    from toolchain.data import load_data
    from toolchain.models import build_from_spec, build_model
    from toolchain.pruning import count_macs_params, load_pruned, prune_to_target, save_pruned
    from toolchain.recipe import (
        AttackConfig,
        CorruptionSuiteConfig,
        EvalAttackConfig,
        TrainConfig,
        ValidateConfig,
    )
    from toolchain.robustness.suite import evaluate
    from toolchain.training import make_loader, train_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_data("signs", image_size=32, train_samples=4000, val_samples=500, seed=0)
    spec = InputSpec(3, 32, 32)
    example = torch.zeros(1, 3, 32, 32)
    cache = Path(args.model_cache) if args.model_cache else None
    history: list[dict[str, float]] = []
    train_seconds = None
    dense = build_model(
        "resnet18", num_classes=data.num_classes, in_channels=3, mean=data.mean, std=data.std, image_size=32
    )
    dense_macs, _ = count_macs_params(dense, example)
    if cache is not None and cache.is_file():
        model, info = load_pruned(cache, build_from_spec, example)
        history, train_seconds = info["extra"]["history"], info["extra"]["train_seconds"]
    else:
        model = dense
        pruned = prune_to_target(
            model, example_inputs=example, criterion="magnitude", macs_reduction=4.0, round_to=16
        )
        attack = AttackConfig(eps=4 / 255, step_size=5 / 255, steps=1)
        cfg = TrainConfig(epochs=args.epochs, lr=0.05, loss="pgd", warmup_epochs=1, attack=attack)
        started = time.perf_counter()
        history = train_model(model, make_loader(data.train, 64, shuffle=True, seed=0), cfg, progress=False)
        train_seconds = time.perf_counter() - started
        if cache is not None:
            extra = {"history": history, "train_seconds": train_seconds}
            save_pruned(
                cache, spec=model.spec, history=pruned.history, state_dict=model.state_dict(), extra=extra
            )
    macs, params = count_macs_params(model, example)
    model.eval()
    validate = ValidateConfig(
        samples=500,
        batch_size=100,
        runtimes=["onnxruntime"],
        attacks=[EvalAttackConfig(name="pgd", eps=4 / 255, steps=10)],
        corruptions=CorruptionSuiteConfig(
            names=["gaussian_noise", "motion_blur", "fog", "low_light"], severities=[1, 3, 5]
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_spec=spec)
        runners = {"fp32": OnnxRuntimeRunner(fp32, threads=2)}
        calibrations = {}
        for calibration, mix in (("clean", CalibrationMix()), ("mixed", CalibrationMix(0.5, 0.25, 0.25))):
            images, counts = build_calibration_set(
                make_loader(data.train, 64, shuffle=True, seed=7),
                256,
                mix,
                model=model,
                corruptions=["gaussian_noise", "motion_blur", "fog", "low_light"],
                attack={"eps": 4 / 255, "steps": 5, "step_size": 1 / 255},
            )
            for method in args.methods.split(","):
                name = f"int8-{calibration}-{method}"
                result = quantize_onnx(
                    fp32, Path(tmp) / f"{name}.onnx", images.numpy(), scheme="u8s8", method=method
                )
                runners[name] = OnnxRuntimeRunner(result.path, threads=2)
                calibrations[name] = {"counts": counts, **result.as_dict()}
        val = make_loader(torch.utils.data.Subset(data.val, range(500)), 100, shuffle=False)
        evaluations = evaluate(model, runners, val, validate, model_name="pruned", progress=False)
        parity = compare_precisions(
            runners["fp32"],
            {k: v for k, v in runners.items() if k != "fp32"},
            val,
            model=model,
            attack={"eps": 4 / 255, "steps": 10},
            corruptions=["gaussian_noise", "motion_blur", "fog", "low_light"],
        )
    by_name = dict(zip(runners, evaluations))
    summary = {}
    for name in calibrations:
        e, f = by_name[name], by_name["fp32"]
        pgd = lambda ev: next(a["accuracy"] for a in ev["attacks"] if a["name"] == "pgd")  # noqa: E731
        summary[name] = {
            "top1_agreement_clean": parity[name]["clean"]["top1_agreement"],
            "top1_agreement_all_inputs": parity[name]["all"]["top1_agreement"],
            "clean_drop_points": 100 * (f["clean_accuracy"] - e["clean_accuracy"]),
            "pgd_drop_points": 100 * (pgd(f) - pgd(e)),
            "corruption_drop_points": 100
            * (f["corruptions"]["mean_accuracy"] - e["corruptions"]["mean_accuracy"]),
        }
    return {
        "model": {
            "arch": "resnet18",
            "pruning": "magnitude, 4x MACs, round_to 16, from random initialisation",
            "macs_reduction": dense_macs / macs,
            "params": params,
            "training": f"{len(history)} epochs single-step PGD-AT (eps 4/255, step 5/255, "
            "1 clean warm-up epoch), "
            "SGD lr 0.05 cosine, signs 32 px, 4,000 images",
            "train_seconds": round(train_seconds, 1),
            "history": history,
        },
        "calibrations": calibrations,
        "evaluations": by_name,
        "parity": parity,
        "summary": summary,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latency.json"))
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--methods", default="minmax,percentile,entropy", help="calibration methods to compare"
    )
    parser.add_argument("--model-cache", help="save the trained model here, or load it if it exists")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-knobs", action="store_true")
    parser.add_argument("--knob-iterations", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "torch", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result: dict[str, Any] = {"benchmark": "latency", "speed": [] if args.skip_speed else speed(args)}
    if not args.skip_knobs:
        result["knobs"] = knobs(args)
    if not args.skip_accuracy:
        result["int8_accuracy"] = accuracy(args)
        sys.stdout.write(json.dumps(result["int8_accuracy"]["summary"], indent=2) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
