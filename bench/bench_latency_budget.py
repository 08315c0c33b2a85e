"""Latency as a pruning budget: how close the measured latency lands to the asked reduction.

    flock /tmp/cpu.lock python bench/bench_latency_budget.py [--out bench/results/latency_budget.json]

For CIFAR ResNet-18 and MobileNetV2 at 32 px (untrained weights: latency does not depend on
them), ONNX Runtime CPU with 2 intra-op threads, and each (target, batch) in
``--targets`` x ``--batches``: the prune stage's search (:mod:`toolchain.pruning.latency_target`)
picks the MACs reduction, the iterative method (magnitude, one step, as the search's candidates;
``round_to`` 16) prunes to it, and the result is timed against the dense model again. Each row
records the target, the MACs reduction handed over, the probes, the measured and predicted
latency reductions, and the MACs reduction the same latency would have been assumed to need
(the target itself).
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
log = logging.getLogger("bench_latency_budget")


def run_one(arch: str, target: float, batch: int, round_to: int | None) -> dict[str, Any]:
    import torch

    from exporters.base import InputSpec
    from toolchain.models import build_model
    from toolchain.pruning.budget import Budget
    from toolchain.pruning.latency_target import magnitude_candidate, resolve_latency_budget, verify
    from toolchain.recipe_prune import LatencyProbe

    torch.manual_seed(0)
    spec = InputSpec(3, 32, 32)
    dense = build_model(
        arch, num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, image_size=32
    ).eval()
    example = torch.zeros(spec.shape(1))
    probe = LatencyProbe(batch=batch, threads=2, iterations=60)
    budget = Budget("macs", target, 0.05, round_to, 0.9)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        macs_budget, search, meter = resolve_latency_budget(
            dense, budget, probe, spec, example, [], Path(tmp)
        )
        model, achieved = magnitude_candidate(dense, macs_budget.reduction, budget, example)
        record = verify(model, achieved, search, meter)
    return {
        "arch": arch,
        "target_latency_reduction": target,
        "batch": batch,
        "round_to": round_to,
        "macs_reduction": achieved,
        "target_met": record["measured_reduction"] >= target * 0.95,
        "seconds": time.perf_counter() - started,
        **record,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv2"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latency_budget.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    rows = []
    for arch in args.archs:
        for batch in args.batches:
            for target in args.targets:
                try:
                    row = run_one(arch, target, batch, round_to=16)
                except Exception as exc:  # a target out of reach is a result too
                    row = {
                        "arch": arch,
                        "target_latency_reduction": target,
                        "batch": batch,
                        "error": str(exc),
                    }
                log.info("%s", {k: v for k, v in row.items() if k != "search"})
                rows.append(row)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(
                    json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=2) + "\n"
                )
    for row in rows:
        head = f"{row['arch']:12} b{row['batch']:<3} target {row['target_latency_reduction']:g}x: "
        if "error" in row:
            sys.stdout.write(head + f"{row['error']}\n")
        else:
            sys.stdout.write(
                head + f"MACs {row['macs_reduction']:.2f}x -> measured {row['measured_reduction']:.2f}x "
                f"(predicted {row['predicted_reduction']:.2f}x, {len(row['search']['probes'])} probes, "
                f"{row['seconds']:.0f} s)\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
