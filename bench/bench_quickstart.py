"""Time the README's quickstart end to end, as a new user runs it, and write JSON.

    python bench/bench_quickstart.py [--recipe deploy_examples/quickstart.yaml]
                                     [--out bench/results/quickstart.json] [--keep DIR]

Runs ``robustprune run`` in a fresh run directory (so nothing is resumed), then records the
wall time, each stage's time, the summary the command printed (the docs show it), and the
headline numbers from its report.json: MACs reduction, pruned-vs-dense ONNX Runtime latency,
accuracies. The target is a quickstart under 5 minutes on 2 CPU cores. ``--keep DIR`` keeps
the run directory there (report.html for the docs' screenshot); by default it is temporary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "deploy_examples" / "quickstart.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "quickstart.json"))
    parser.add_argument("--target-seconds", type=float, default=300.0)
    parser.add_argument("--keep", type=Path, help="run directory to create and keep (must not exist)")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists; name a new folder")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.keep.resolve() if args.keep is not None else Path(tmp) / "run"
        cmd = [sys.executable, "-m", "toolchain", "run", args.recipe, "--out", str(run_dir), "--no-progress"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        report = json.loads((run_dir / "report.json").read_text())

    fp32 = {(r["model"], r["batch"]): r for r in report["latency"] if r["precision"] == "fp32"}
    speedups = {
        f"batch_{b}": fp32[("dense", b)]["p50_ms"] / fp32[("pruned", b)]["p50_ms"]
        for (m, b) in fp32
        if m == "pruned" and ("dense", b) in fp32
    }
    int8 = {
        f"{r['calibration']}/batch_{r['batch']}": {
            "vs_pruned_fp32": fp32[("pruned", r["batch"])]["p50_ms"] / r["p50_ms"],
            "vs_dense_fp32": fp32[("dense", r["batch"])]["p50_ms"] / r["p50_ms"],
        }
        for r in report["latency"]
        if r["precision"] == "int8" and r["runtime"] == "onnxruntime"
    }
    result = {
        "benchmark": "quickstart",
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO)),
        "wall_seconds": round(wall, 1),
        "target_seconds": args.target_seconds,
        "within_target": wall <= args.target_seconds,
        "exit_code": proc.returncode,
        "command": "robustprune run " + str(Path(args.recipe).resolve().relative_to(REPO)),
        "printed": proc.stdout.replace(str(run_dir), "runs/quickstart"),
        "stage_seconds": report["stage_seconds"],
        "macs_reduction": report["models"]["pruned"]["macs_reduction"],
        "params_reduction": report["models"]["pruned"]["params_reduction"],
        "onnxruntime_p50_speedup_pruned_vs_dense": speedups,
        "onnxruntime_p50_speedup_int8": int8,
        "quantization": [
            {k: q[k] for k in ("calibration", "scheme", "counts", "fusion", "vs_fp32")}
            for q in report["quantization"]
        ],
        "accuracy": {
            f"{e['model']}/{e['runtime']}/{e['precision']}"
            + (f"/{e['calibration']}" if e.get("calibration") else ""): {
                "clean": e["clean_accuracy"],
                "corruptions_mean": e.get("corruptions", {}).get("mean_accuracy"),
                **{f"{a['name']}/{a['mode']}": a["accuracy"] for a in e["attacks"]},
            }
            for e in report["evaluations"]
        },
        "gates_passed": report["passed"],
        "environment": report["environment"],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
