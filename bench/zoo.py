"""Every torchvision classifier through robustprune: prune 2x, export, parity, validate, or a reason.

    flock /tmp/cpu.lock python bench/zoo.py [--models resnet18 vit_b_16 ...] [--size 64]
        [--jobs 1] [--budget SECONDS] [--timeout 900] [--memory-gb 12] [--threads 1]
        [--out bench/results/zoo.json] [--redo] [--readme README.md]
    python bench/zoo.py --table [--readme README.md] [--out bench/results/zoo.json]

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (or each name of
``--models``; a name with a colon, such as ``tests.tiny_models:AuxNet``, is used as
``model.arch`` as it is) a trial (``toolchain.trial``: the real pipeline with tiny settings, no
dense training, ``iterative`` ``magnitude`` pruning to 2x fewer MACs, one fine-tuning epoch on
8 images, ONNX export with parity, clean validation on PyTorch and ONNX Runtime) runs in its own
subprocess, so its peak RSS (``ru_maxrss`` of that process) is its own; a watchdog kills it
above ``--memory-gb`` of resident memory or after ``--timeout`` seconds. Inputs are small: 64 px,
except models that need more (MaxViT 224, Inception v3 299: its auxiliary head needs a 17x17 map
in train mode) or whose patch size divides 56 (ViT-H/14).

``--jobs N`` runs N trials at once (each with ``--threads`` torch threads; each record keeps
the ``jobs`` it ran beside, as its seconds depend on it). ``--budget S`` starts no model after S
seconds, so a sweep can run in batches that each hold the shared CPU lock briefly. Results are
written after every model (``--out``, JSON); a sweep resumes where it stopped: models already in
``--out`` are skipped unless ``--redo``. ``--table`` prints the Markdown table; ``--readme``
writes it and the one-line summary between the README's ``zoo:table`` and ``zoo:summary``
markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "zoo.json"
SIZES = {"maxvit_t": 224, "inception_v3": 299, "vit_h_14": 56}

log = logging.getLogger("zoo")


def size_for(name: str, default: int) -> int:
    """The input side a model is tried at (see the module docstring)."""
    return SIZES.get(name, default)


def arch_for(name: str) -> str:
    """``model.arch`` of a sweep entry: a torchvision name, or a factory path as it is."""
    return name if ":" in name else f"torchvision:{name}"


def worker(name: str, size: int, threads: int, result_path: Path) -> None:
    """Run one trial in this process and write its result (the parent measures time and RSS)."""
    import torch

    from toolchain.trial import run_trial

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="zoo-") as work:
        result = run_trial(arch_for(name), size, work)
    result_path.write_text(json.dumps(result.to_dict()))


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


class Trial:
    """One model's trial in a watched subprocess (start it, then :meth:`poll` until a record)."""

    def __init__(self, name: str, size: int, *, timeout: float, memory_bytes: int, threads: int) -> None:
        self.name, self.size, self.timeout, self.memory_bytes = name, size, timeout, memory_bytes
        self._tmp = tempfile.TemporaryDirectory(prefix="zoo-result-")
        self._result = Path(self._tmp.name) / "result.json"
        self._stderr = Path(self._tmp.name) / "stderr.txt"
        cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--threads", str(threads)]
        cmd += ["--result", str(self._result)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.started = time.perf_counter()
        with self._stderr.open("wb") as stderr_file:  # a file, not a pipe: a full pipe would block it
            self._proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file
            )
        self._killed: str | None = None

    def poll(self) -> dict[str, Any] | None:
        """The record once the process has ended (killing it past a cap), else None.

        The record is the trial result plus ``seconds`` (wall) and ``peak_rss_bytes``, or a
        ``failed`` record saying why the process ended without a result.
        """
        pid, status, usage = os.wait4(self._proc.pid, os.WNOHANG)
        if not pid:
            if self._killed is None:
                if _rss_bytes(self._proc.pid) > self.memory_bytes:
                    self._killed = f"killed: resident memory above {self.memory_bytes / 2**30:g} GiB"
                elif time.perf_counter() - self.started > self.timeout:
                    self._killed = f"killed: still running after {self.timeout:.0f} s"
                if self._killed:
                    self._proc.send_signal(signal.SIGKILL)
            return None
        self._proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.perf_counter() - self.started
        stderr = self._stderr.read_text(errors="replace")
        if self._result.is_file():
            record = json.loads(self._result.read_text())
        else:
            last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
            record = {
                "arch": arch_for(self.name),
                "image_size": self.size,
                "outcome": "failed",
                "stage": None,
                "reason": self._killed or f"worker exited with status {self._proc.returncode}: {last}",
            }
        self._tmp.cleanup()
        # ru_maxrss is in kilobytes on Linux.
        return {"model": self.name, **record, "seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


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


def summary(results: list[dict[str, Any]], models: list[str] | None = None) -> dict[str, Any]:
    """Counts per outcome, the share of the swept models that works, and the models of
    ``models`` (the sweep's list) that have no result yet."""
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("works", "refused", "failed")}
    swept = {r["model"] for r in results}
    not_run = [m for m in (models or []) if m not in swept]
    return {
        **counts,
        "total": len(results),
        "works_share": counts["works"] / max(len(results), 1),
        "not_run": not_run,
    }


def summary_line(payload: dict[str, Any]) -> str:
    """One sentence for the README: how many work, of how many swept and listed."""
    s = summary(payload["results"], payload.get("models"))
    listed = len(payload.get("models") or []) or s["total"]
    line = (
        f"{s['works']} of {s['total']} models swept work ({100 * s['works_share']:.0f}%), "
        f"{s['refused']} refused before training, {s['failed']} failed"
    )
    if s["not_run"]:
        line += f"; {len(s['not_run'])} of the {listed} not run yet: {', '.join(s['not_run'])}"
    return line


def table(results: list[dict[str, Any]]) -> str:
    """The README's Markdown table."""
    header = ["model", "input", "works", "MACs reduction", "parity: max abs diff (max abs logit)"]
    header += ["seconds (jobs)", "peak RSS (x fp32 weights)", "reason"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: r["model"]):
        reduction = f"{r['macs_reduction']:.2f}x" if r.get("macs_reduction") else ""
        diff = r.get("parity_max_abs_diff")
        parity = f"{diff:.1e} ({r.get('logit_scale') or 0:.3g})" if diff is not None else ""
        if r.get("float64_engine_diff") is not None:  # beyond atol: both measured against float64
            parity += f"; vs float64: torch {r['float64_torch_diff']:.1e}, ORT {r['float64_engine_diff']:.1e}"
            if r.get("top1_agreement") != 1.0 and r.get("float64_engine_top1") is not None:
                parity += (
                    f"; top-1 as float64: torch {r['float64_torch_top1']:.3f}, "
                    f"ORT {r['float64_engine_top1']:.3f}"
                )
        reason = (r.get("reason") or "").replace("|", "\\|")  # a bar would end the cell
        if len(reason) > 160:
            reason = reason[:157] + "..."
        weights = 4 * r["dense_params"] if r.get("dense_params") else 0
        copies = f" ({r['peak_rss_bytes'] / weights:.1f}x)" if weights else ""
        rows.append(
            f"| {r['model']} | {r['image_size']} | {r['outcome']} | {reduction} | {parity} | "
            f"{r['seconds']:.0f} ({r.get('jobs', 1)}) | {r['peak_rss_bytes'] / 2**30:.2f} GiB{copies} | "
            f"{reason} |"
        )
    return "\n".join(rows)


def render_readme(text: str, payload: dict[str, Any]) -> str:
    """``text`` with the table and the summary line written between their markers
    (``<!-- zoo:table -->`` ... ``<!-- /zoo:table -->``, the same for ``zoo:summary``).

    Raises:
        ValueError: a marker pair is missing.
    """
    parts = {
        "table": "\n" + table(payload["results"]) + "\n\n" + summary_line(payload) + ".\n",
        "summary": summary_line(payload),
    }
    for key, body in parts.items():
        found = re.search(rf"<!-- zoo:{key} -->(.*?)<!-- /zoo:{key} -->", text, re.DOTALL)
        if found is None:
            raise ValueError(f"no <!-- zoo:{key} --> ... <!-- /zoo:{key} --> markers in the README")
        start, end = found.span(1)
        text = text[:start] + body + text[end:]
    return text


def _sweep(
    args: argparse.Namespace, names: list[str], universe: list[str], argv: list[str] | None
) -> dict[str, Any]:
    """Run the trials of ``names`` not yet in ``args.out``, writing it after each; returns it.

    ``universe`` is every model the sweep is meant to cover (the JSON's ``models``, so the
    models not run yet are listed).
    """
    data = _load(args.out)
    done = {r["model"] for r in data["results"]} if not args.redo else set()
    todo = [n for n in names if n not in done]
    results = [r for r in data["results"] if not args.redo or r["model"] not in names]
    commands = data.get("commands", [])
    commands.append("python bench/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv))
    models = list(data.get("models") or universe)
    models += [n for n in names if n not in models]
    payload: dict[str, Any] = dict(data)
    started = time.perf_counter()
    running: list[tuple[Trial, str]] = []
    while todo or running:
        in_budget = args.budget is None or time.perf_counter() - started < args.budget
        while todo and in_budget and len(running) < args.jobs:
            name = todo.pop(0)
            when = datetime.now(timezone.utc).isoformat(timespec="seconds")
            trial = Trial(
                name,
                size_for(name, args.size),
                timeout=args.timeout,
                memory_bytes=int(args.memory_gb * 2**30),
                threads=args.threads,
            )
            running.append((trial, when))
        if not in_budget and todo:
            log.info("budget of %.0f s spent: %d models left for the next run", args.budget, len(todo))
            todo = []
        for trial, when in list(running):
            record = trial.poll()
            if record is None:
                continue
            running.remove((trial, when))
            record.update(
                jobs=args.jobs,
                threads=args.threads,
                timeout_s=args.timeout,
                memory_cap_gib=args.memory_gb,
                started_utc=when,
            )
            log.info(
                "%-22s %-7s %6.1f s %6.2f GiB %s",
                record["model"],
                record["outcome"],
                record["seconds"],
                record["peak_rss_bytes"] / 2**30,
                record.get("reason") or "",
            )
            results = [r for r in results if r["model"] != record["model"]] + [record]
            payload = {
                "benchmark": "zoo",
                "commands": commands,
                "environment": _environment(args.threads, args.timeout, args.memory_gb),
                "settings": {"default_size": args.size, "sizes": SIZES, "macs_reduction": 2.0},
                "models": models,
                "summary": summary(results, models),
                "results": results,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=1))
        time.sleep(0.2)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision names (default: every classifier)")
    parser.add_argument("--size", type=int, default=64, help="input side (models that need more get more)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once")
    parser.add_argument("--budget", type=float, help="start no model after this many seconds")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--memory-gb", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--redo", action="store_true", help="run models already in --out again")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out, run nothing")
    parser.add_argument("--readme", type=Path, help="write the table and summary into this README")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)
        worker(args.worker, args.size, args.threads, args.result)
        return 0
    if args.table:
        payload = _load(args.out)
    else:
        import torchvision.models

        universe = torchvision.models.list_models(module=torchvision.models)
        payload = _sweep(args, args.models or universe, universe, argv)
    if args.readme:
        args.readme.write_text(render_readme(args.readme.read_text(), payload))
    print(table(payload["results"]) + "\n\n" + summary_line(payload) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
