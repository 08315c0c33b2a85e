"""Compare pruning criteria from one dense model: accuracy and robustness after pruning.

    python bench/bench_criteria.py [--recipe deploy_examples/quickstart.yaml]
                                   [--criteria magnitude taylor adv-taylor random]
                                   [--out bench/results/criteria.json]

Runs the recipe once, then re-runs it once per criterion in a copy of that run directory:
the dense training stage is reused (same key), so every criterion starts from the very same
weights and differs only in which channels it removed. Records the ONNX Runtime evaluation of
each pruned model (clean, PGD transfer, Square, corruptions) and the dense reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(recipe: str, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "toolchain", "run", recipe, "--out", str(out), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode not in (0, 1):
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "report.json").read_text())


def _summary(report: dict, model: str) -> dict:
    (ev,) = [e for e in report["evaluations"] if e["model"] == model and e["runtime"] == "onnxruntime"]
    return {
        "clean": ev["clean_accuracy"],
        "corruptions_mean": ev.get("corruptions", {}).get("mean_accuracy"),
        "relative_mce": ev.get("corruptions", {}).get("relative_mce"),
        **{f"{a['name']}/{a['mode']}": a["accuracy"] for a in ev["attacks"]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "deploy_examples" / "quickstart.yaml"))
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "taylor", "adv-taylor", "random"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "criteria.json"))
    args = parser.parse_args()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        start = time.perf_counter()
        report = _run(args.recipe, base)
        results["dense"] = _summary(report, "dense")
        for criterion in args.criteria:
            out = Path(tmp) / criterion
            shutil.copytree(base, out)
            t0 = time.perf_counter()
            report = _run(args.recipe, out, f"prune.criterion={criterion}")
            results[criterion] = {
                "macs_reduction": report["models"]["pruned"]["macs_reduction"],
                "seconds": round(time.perf_counter() - t0, 1),
                **_summary(report, "pruned"),
            }
    payload = {
        "benchmark": "criteria",
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO)),
        "note": "one dense model, one seed, quickstart-sized validation: a few points of difference is noise",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2) + "\n")
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
