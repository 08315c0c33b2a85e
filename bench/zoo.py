"""Every torchvision classifier through robustprune: prune 2x, export, parity, validate, or a reason.

    flock /tmp/cpu.lock python bench/zoo.py [--models resnet18 vit_b_16 ...] [--size 64]
        [--timeout 900] [--memory-gb 12] [--threads 1] [--out bench/results/zoo.json] [--redo]
    python bench/zoo.py --table [--out bench/results/zoo.json]

For each model of ``torchvision.models.list_models(module=torchvision.models)`` a trial
(``toolchain.trial``: the real pipeline with tiny settings, no dense training, ``iterative``
``magnitude`` pruning to 2x fewer MACs, one fine-tuning epoch on 8 images, ONNX export with
parity, clean validation on PyTorch and ONNX Runtime) runs in its own subprocess, so its peak
RSS (``ru_maxrss`` of that process) is its own; a watchdog kills it above ``--memory-gb`` of
resident memory or after ``--timeout`` seconds. Inputs are small: 64 px, except models that need
more (MaxViT 224, Inception v3 299: its auxiliary head needs a 17x17 map in train mode) or whose
patch size divides 56 (ViT-H/14).

Results are written after every model (``--out``, JSON); an interrupted sweep resumes where it
stopped unless ``--redo``. ``--table`` prints the Markdown table the README shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "zoo.json"
SIZES = {"maxvit_t": 224, "inception_v3": 299, "vit_h_14": 56}

log = logging.getLogger("zoo")


def size_for(name: str, default: int) -> int:
    """The input side a model is tried at (see the module docstring)."""
    return SIZES.get(name, default)


def worker(name: str, size: int, threads: int, result_path: Path) -> None:
    """Run one trial in this process and write its result (the parent measures time and RSS)."""
    import torch

    from toolchain.trial import run_trial

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as work:
        result = run_trial(f"torchvision:{name}", size, work)
    result_path.write_text(json.dumps(result.to_dict()))


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def run_one(name: str, size: int, *, timeout: float, memory_bytes: int, threads: int) -> dict[str, Any]:
    """One model in a subprocess, watched; returns the trial result plus ``seconds`` (wall) and
    ``peak_rss_bytes``, or a ``failed`` record saying why the process ended."""
    with tempfile.TemporaryDirectory(prefix="zoo-result-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--threads", str(threads)]
        cmd += ["--result", str(result_path)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        stderr_path = Path(tmp) / "stderr.txt"
        with stderr_path.open("wb") as stderr_file:  # a file, not a pipe: a full pipe would block it
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
        killed = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _rss_bytes(proc.pid) > memory_bytes:
                killed = f"killed: resident memory above {memory_bytes / 2**30:.0f} GiB"
            elif time.perf_counter() - started > timeout:
                killed = f"killed: still running after {timeout:.0f} s"
            if killed:
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        stderr = stderr_path.read_text(errors="replace")
        peak = usage.ru_maxrss * 1024  # kilobytes on Linux
        if result_path.is_file():
            record = json.loads(result_path.read_text())
        else:
            last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
            record = {
                "arch": f"torchvision:{name}",
                "image_size": size,
                "outcome": "failed",
                "stage": None,
                "reason": killed or f"worker exited with status {os.waitstatus_to_exitcode(status)}: {last}",
            }
    return {"model": name, **record, "seconds": seconds, "peak_rss_bytes": peak}


def _load(out: Path) -> dict[str, Any]:
    if out.is_file():
        return json.loads(out.read_text())
    return {"results": []}


def _environment(threads: int, timeout: float, memory_gb: float) -> dict[str, Any]:
    import onnxruntime
    import torch
    import torch_pruning
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": torch_pruning.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "timeout_s": timeout,
        "memory_cap_gib": memory_gb,
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per outcome, and the share that works."""
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("works", "refused", "failed")}
    return {**counts, "total": len(results), "works_share": counts["works"] / max(len(results), 1)}


def table(results: list[dict[str, Any]]) -> str:
    """The README's Markdown table."""
    header = ["model", "input", "works", "MACs reduction", "parity: max abs diff (max abs logit)"]
    header += ["seconds", "peak RSS (x fp32 weights)", "reason"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: r["model"]):
        reduction = f"{r['macs_reduction']:.2f}x" if r.get("macs_reduction") else ""
        diff = r.get("parity_max_abs_diff")
        parity = f"{diff:.1e} ({r.get('logit_scale') or 0:.3g})" if diff is not None else ""
        reason = (r.get("reason") or "").replace("|", "/")
        if len(reason) > 160:
            reason = reason[:157] + "..."
        weights = 4 * r["dense_params"] if r.get("dense_params") else 0
        copies = f" ({r['peak_rss_bytes'] / weights:.1f}x)" if weights else ""
        rows.append(
            f"| {r['model']} | {r['image_size']} | {r['outcome']} | {reduction} | {parity} | "
            f"{r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB{copies} | {reason} |"
        )
    s = summary(results)
    rows.append("")
    rows.append(
        f"{s['works']} of {s['total']} work ({100 * s['works_share']:.0f}%), "
        f"{s['refused']} refused before training, {s['failed']} failed."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision names (default: every classifier)")
    parser.add_argument("--size", type=int, default=64, help="input side (models that need more get more)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--memory-gb", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redo", action="store_true", help="run models already in --out again")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)
        worker(args.worker, args.size, args.threads, args.result)
        return 0
    if args.table:
        print(table(_load(args.out)["results"]))
        return 0

    import torchvision.models

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    data = _load(args.out)
    done = {r["model"] for r in data["results"]} if not args.redo else set()
    results = [r for r in data["results"] if r["model"] in done or r["model"] not in names]
    for name in names:
        if name in done:
            continue
        size = size_for(name, args.size)
        record = run_one(
            name, size, timeout=args.timeout, memory_bytes=int(args.memory_gb * 2**30), threads=args.threads
        )
        log.info(
            "%-22s %-7s %6.1f s %6.2f GiB %s",
            name,
            record["outcome"],
            record["seconds"],
            record["peak_rss_bytes"] / 2**30,
            record.get("reason") or "",
        )
        results = [r for r in results if r["model"] != name] + [record]
        payload = {
            "benchmark": "zoo",
            "command": "python bench/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": _environment(args.threads, args.timeout, args.memory_gb),
            "settings": {"default_size": args.size, "sizes": SIZES, "macs_reduction": 2.0},
            "summary": summary(results),
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
