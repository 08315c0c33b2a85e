"""Benchmark: corruption speed, strength and memory, against the reference implementation.

The reference is ``imagecorruptions-imaug`` (PyPI, the maintained fork of the ImageNet-C code;
part of the ``[dev]`` extra). It corrupts one ``H x W x 3`` uint8 image per call, so it is timed
per image; ours is timed on a whole batch and divided by the batch size. Both see the same
photographs (crops of scikit-image's sample photos, resized with PIL), in the same run.

Parts (``--parts``, default all):

- ``speed``: 224x224, every corruption x severity, ms per image, ours vs the reference, and the
  strength ratio (mean |corrupted - clean| ours / reference) per severity from the same outputs.
- ``fidelity``: the strength ratio at 32x32 as well (more images; the reference is fast there).
- ``throughput``: images/s per corruption (all severities, best of 3 after a warm-up call at the
  size) at 32x32, 224x224 and 512x256
  (W x H), ours and the reference.
- ``kernels``: every corruption with the compiled CPU kernels (numba) and on the torch path it
  takes on CUDA or without numba, ms per image and severity
  at 224x224, 512x256 and 1920x1080 (not in the default parts; ``--out`` a separate file).
- ``memory``: peak resident memory while corrupting a batch of 64 frames at 512x256, per
  corruption at severity 5, each in a fresh process: ``ru_maxrss`` minus the resident set once
  the input exists, i.e. everything one call needs beyond its input (output included).

``--render FILE.json [--before OLD.json]`` prints the README's tables from a result.

Run it on one core, alone, so the numbers mean something::

    OMP_NUM_THREADS=1 flock /tmp/cpu.lock taskset -c 0 python bench/bench_corruptions.py \
        [--parts speed,fidelity,throughput,memory] [--out bench/results/corruptions.json]
    ... python bench/bench_corruptions.py --parts kernels --out bench/results/corruption_kernels.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolchain.robustness.corruptions import SEVERITIES, corrupt, list_corruptions

log = logging.getLogger("bench_corruptions")

IMAGENET_C = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)  # fmt: skip
REFERENCE_EXTRA = ("speckle_noise", "saturate")  # the reference has them too (validation set)
SEEDED_BY_KEYWORD = {"glass_blur", "impulse_noise"}  # the reference ignores np.random.seed for these


# --------------------------------------------------------------------------- images


def photos(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, height, width)`` float crops of natural photographs, 8-bit values / 255.

    Random crops (60-100 % of the largest window with the target's aspect) of scikit-image's
    sample photographs, resized with PIL's antialiased bicubic; falls back to smooth synthetic
    scenes when scikit-image is absent.
    """
    rng = np.random.default_rng(seed)
    try:
        import skimage.data as data

        sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        sources.append(data.stereo_motorcycle()[0])
    except ImportError:
        log.warning("scikit-image missing: synthetic images instead of photographs")
        sources = [_synthetic(rng) for _ in range(5)]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        sh, sw = src.shape[:2]
        scale = min(sh / height, sw / width) * rng.uniform(0.6, 1.0)
        ch, cw = int(height * scale), int(width * scale)
        top, left = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
        crop = Image.fromarray(src[top : top + ch, left : left + cw])
        out.append(np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC)))
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255).contiguous()


def _synthetic(rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.mgrid[0:400, 0:600] / 400.0
    img = np.stack([0.2 + 0.5 * xs, 0.3 + 0.4 * ys, 0.8 - 0.4 * xs * ys], -1) * rng.uniform(0.7, 1.0)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` [0, 1] -> ``(N, H, W, 3)`` uint8, truncating as the reference does."""
    return np.floor(x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


# --------------------------------------------------------------------------- both implementations


def load_reference() -> Callable[..., np.ndarray] | None:
    """The reference's ``corrupt`` function, single-threaded, or None when it is not installed."""
    try:
        import cv2
        from imagecorruptions import corrupt as reference_corrupt
    except ImportError as err:
        log.warning("imagecorruptions-imaug not importable (%s): reference columns left empty", err)
        return None
    cv2.setNumThreads(1)
    return reference_corrupt


def run_reference(ref: Callable[..., np.ndarray], name: str, images: np.ndarray, severity: int) -> np.ndarray:
    """Reference outputs ``(N, H, W, 3)`` uint8, one call per image, seeded per image."""
    out = []
    for i, img in enumerate(images):
        np.random.seed(1000 * severity + i)
        kwargs = {"seed": 1000 * severity + i} if name in SEEDED_BY_KEYWORD else {}
        out.append(ref(img, severity=severity, corruption_name=name, **kwargs))
    return np.stack(out)


def strength(corrupted: np.ndarray, clean: np.ndarray) -> float:
    """Mean absolute 8-bit difference to the clean images."""
    return float(np.abs(corrupted.astype(np.float32) - clean.astype(np.float32)).mean())


REPEATS = 3  # both sides are timed best of 3: this machine's timings wander by ~10 %


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Best-of-``repeats`` wall time of ``fn()`` and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def each_severity(call: Callable[[int], object]) -> None:
    """``call(s)`` for every severity, each result dropped before the next call, as a pipeline
    that consumes its batches does. (Holding all five 25 MB results at 512x256 made every call
    fault in fresh zeroed pages for its output: a measure of the allocator, not the corruption.)"""
    for s in SEVERITIES:
        call(s)


def names_for(with_reference: bool) -> list[str]:
    ours = list_corruptions()
    first = [n for n in (*IMAGENET_C, *REFERENCE_EXTRA) if n in ours]
    return first + [n for n in ours if n not in first] if with_reference else ours


# --------------------------------------------------------------------------- parts


def compare(x: torch.Tensor, ref: Callable[..., np.ndarray] | None, ref_images: int, repeats: int) -> dict:
    """Per corruption and severity: ms/image ours (whole batch) and reference, strength ratio.

    Both sides are timed the same way, best of ``repeats`` calls, so one noisy call (this
    machine's timings wander by ~10 %) counts against neither.
    """
    clean = to_uint8(x)
    rows: dict[str, dict] = {}
    for name in names_for(ref is not None):
        with_ref = ref is not None and name in (*IMAGENET_C, *REFERENCE_EXTRA)
        row: dict[str, dict] = {"ours_ms": {}, "reference_ms": {}, "ratio": {}}
        for sev in SEVERITIES:
            t, out = timed(lambda n=name, s=sev: corrupt(n, x, s, seed=s), repeats)
            row["ours_ms"][str(sev)] = round(1000 * t / len(x), 3)
            if with_ref:
                sub = clean[:ref_images]
                t_ref, ref_out = timed(lambda n=name, s=sev, im=sub: run_reference(ref, n, im, s), repeats)
                row["reference_ms"][str(sev)] = round(1000 * t_ref / len(sub), 3)
                ours_u8 = to_uint8(out)  # type: ignore[arg-type]
                ratio = strength(ours_u8[: len(sub)], sub) / max(strength(ref_out, sub), 1e-9)
                row["ratio"][str(sev)] = round(ratio, 3)
        row["ours_ms_total"] = round(sum(row["ours_ms"].values()), 2)
        if with_ref:
            row["reference_ms_total"] = round(sum(row["reference_ms"].values()), 2)
            row["speedup"] = round(row["reference_ms_total"] / row["ours_ms_total"], 2)
        rows[name] = row
        log.info(
            "%-18s ours %8.2f ms  ref %8s ms  ratio %s", name, row["ours_ms_total"],
            row.get("reference_ms_total", "-"), list(row["ratio"].values()),
        )  # fmt: skip
    return rows


def summary(rows: dict) -> dict:
    """Totals over the 15 ImageNet-C corruptions x 5 severities (ms per image)."""
    present = [n for n in IMAGENET_C if "reference_ms_total" in rows.get(n, {})]
    ours = sum(rows[n]["ours_ms_total"] for n in IMAGENET_C if n in rows)
    out = {"imagenet_c_ours_ms_per_image": round(ours, 2)}
    if len(present) == len(IMAGENET_C):
        ref = sum(rows[n]["reference_ms_total"] for n in present)
        out |= {
            "imagenet_c_reference_ms_per_image": round(ref, 2),
            "imagenet_c_speedup": round(ref / ours, 2),
            "slowest_vs_reference": min((rows[n]["speedup"], n) for n in present),
        }
    return out


def throughput(sizes: list[tuple[int, int]], batch: dict, ref: Callable[..., np.ndarray] | None) -> dict:
    """Images/s per corruption (all five severities) for each ``(H, W)``, ours and reference."""
    result: dict[str, dict] = {}
    for h, w in sizes:
        x = photos(batch[(h, w)], h, w, seed=h + w)
        clean = to_uint8(x)[:2]
        per: dict[str, dict] = {}
        for name in names_for(ref is not None):
            corrupt(name, x[:1], 1)  # the first call at a new size builds its cached tables
            t, _ = timed(lambda n=name, im=x: each_severity(lambda s: corrupt(n, im, s, seed=s)), REPEATS)
            row = {"ours_images_per_s": round(5 * len(x) / t, 1)}
            if ref is not None and name in (*IMAGENET_C, *REFERENCE_EXTRA):
                t_ref, _ = timed(
                    lambda n=name, im=clean: each_severity(lambda s: run_reference(ref, n, im, s)), REPEATS
                )
                row["reference_images_per_s"] = round(5 * len(clean) / t_ref, 1)
            per[name] = row
        result[f"{w}x{h}"] = {"batch": len(x), "height": h, "width": w, "per_corruption": per}
        log.info("%dx%d: %s", w, h, {n: r["ours_images_per_s"] for n, r in per.items()})
    return result


def compiled_vs_torch() -> dict:
    """ms per image and severity of every corruption with the numba kernels (and the FFT blurs they
    come with) and on the torch path, same inputs, same run."""
    from toolchain.robustness.corruptions import kernels

    if not kernels.AVAILABLE:
        return {"skipped": "numba is not installed"}
    result: dict[str, dict] = {}
    for h, w, n in ((224, 224, 16), (256, 512, 8), (1080, 1920, 2)):
        x = photos(n, h, w, seed=h + w)
        per: dict[str, dict] = {}
        for name in list_corruptions():
            row = {}
            for path, available in (("compiled", True), ("torch", False)):
                kernels.AVAILABLE = available
                try:
                    corrupt(name, x[:1], 1)
                    call = lambda s, n=name, im=x: corrupt(n, im, s, seed=s)  # noqa: E731
                    t, _ = timed(lambda c=call: each_severity(c), REPEATS)
                finally:
                    kernels.AVAILABLE = True
                row[f"{path}_ms"] = round(1000 * t / (5 * n), 3)
            row["speedup"] = round(row["torch_ms"] / row["compiled_ms"], 2)
            per[name] = row
        result[f"{w}x{h}"] = {"batch": n, "per_corruption": per}
        log.info("%dx%d compiled vs torch: %s", w, h, per)
    return result


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(name: str, batch: int, height: int, width: int) -> None:
    """In a fresh process: RSS with the input ready, then the peak RSS of one corruption call.

    Making the input has its own, higher peak; writing 5 to ``/proc/self/clear_refs`` resets the
    kernel's high-water mark (``VmHWM``) so the peak read afterwards is the corruption's own.
    Where that file cannot be written, ``ru_maxrss`` is used and the peak may be the input's.
    """
    torch.set_num_threads(1)
    x = photos(batch, height, width, seed=7)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    base = _status_mib("VmRSS")
    corrupt(name, x, 5, seed=1)
    # ru_maxrss is in KiB on Linux
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mib": round(base, 1), "peak_mib": round(peak, 1), "peak_reset": reset}))


def memory(batch: int, height: int, width: int) -> dict:
    """Peak RSS per corruption at severity 5 for one ``batch`` at ``height x width``.

    Each corruption runs in a fresh interpreter, so nothing another one left in the allocator
    hides its peak: ``extra = peak - VmRSS once the input exists`` (the peak counted from
    then on, see :func:`memory_child`), which counts the output, every temporary and the cached
    tables the call builds.
    """
    if not Path("/proc/self/status").exists():
        return {"skipped": "needs Linux /proc/self/status for the resident set size"}
    per: dict[str, dict] = {}
    for name in list_corruptions():
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            name,
            "--memory-shape",
            f"{batch},{height},{width}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["extra_mib"] = round(row["peak_mib"] - row["base_mib"], 1)
        per[name] = row
    worst = max(per, key=lambda n: per[n]["extra_mib"])
    output_mib = batch * 3 * height * width * 4 / 2**20
    log.info("memory extra MiB (batch %d at %dx%d): %s", batch, width, height,
             {n: r["extra_mib"] for n, r in per.items()})  # fmt: skip
    return {
        "batch": batch, "height": height, "width": width, "severity": 5,
        "input_mib": round(output_mib, 1), "output_mib": round(output_mib, 1),
        "per_corruption": per, "worst": [worst, per[worst]["extra_mib"]],
        "method": "fresh process per corruption; extra = VmHWM - VmRSS with the input ready, the "
                  "high-water mark reset (/proc/self/clear_refs) after making the input "
                  "(includes the output, temporaries and cached tables)",
    }  # fmt: skip


def environment() -> dict:
    env = {
        "torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }  # fmt: skip
    try:
        from importlib.metadata import version

        env["imagecorruptions_imaug"] = version("imagecorruptions-imaug")
    except Exception:  # not installed: the reference columns are empty
        env["imagecorruptions_imaug"] = None
    return env


def _x(a: float, b: float) -> str:
    return f"{a / b:.1f}×"


def render(result: dict, before: dict | None = None) -> str:
    """The README's markdown tables from a result JSON: speed and strength, throughput (the
    default parts), or compiled vs torch path (``--parts kernels``)."""
    lines: list[str] = []
    if "speed_224" in result:
        lines += _speed_table(result, before or {})
    sizes = result.get("throughput", {})
    if sizes:
        lines += ["", "| corruption | " + " | ".join(
            f"{key}: ours (batch {v['batch']}) / reference" for key, v in sizes.items()) + " |",
            "|---|" + "---:|" * len(sizes)]  # fmt: skip
        for name in next(iter(sizes.values()))["per_corruption"]:
            cells = []
            for v in sizes.values():
                row = v["per_corruption"][name]
                ref = row.get("reference_images_per_s")
                cells.append(f"{row['ours_images_per_s']:,.0f} / {f'{ref:,.0f}' if ref else '–'}")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    kernels = result.get("compiled_vs_torch", {})
    if kernels and "skipped" not in kernels:
        lines += ["| corruption | " + " | ".join(
            f"{key}: compiled / torch path, ms (speed-up)" for key in kernels) + " |",
            "|---|" + "---:|" * len(kernels)]  # fmt: skip
        for name in next(iter(kernels.values()))["per_corruption"]:
            cells = [
                f"{r['compiled_ms']:.2f} / {r['torch_ms']:.2f} ({r['speedup']:.1f}×)"
                for r in (v["per_corruption"][name] for v in kernels.values())
            ]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def _speed_table(result: dict, before: dict) -> list[str]:
    speed = result["speed_224"]["per_corruption"]
    fidelity = result.get("fidelity_32", {}).get("per_corruption", {})
    old = before.get("speed_224", {}).get("per_corruption", {})
    lines = [
        "| corruption | before, ms | now, ms | reference, ms | now vs reference "
        "| strength ours / reference at 224 px, severities 1–5 | same at 32 px |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, row in speed.items():
        ref = row.get("reference_ms_total")
        ratios = " ".join(f"{v:.2f}" for v in row["ratio"].values()) or "–"
        small = " ".join(f"{v:.2f}" for v in fidelity.get(name, {}).get("ratio", {}).values()) or "–"
        was = old.get(name, {}).get("ours_ms_total")
        lines.append(
            f"| `{name}` | {f'{was:.1f}' if was is not None else '–'} | {row['ours_ms_total']:.1f} | "
            f"{f'{ref:.1f}' if ref else '–'} | {_x(ref, row['ours_ms_total']) if ref else '–'} "
            f"| {ratios} | {small} |"
        )
    total = result["speed_224"]["summary"]
    was_ms = before.get("speed_224", {}).get("summary", {}).get("imagenet_c_ours_ms_per_image")
    lines.append(
        f"| **15 ImageNet-C** | **{f'{was_ms:.1f}' if was_ms is not None else '–'}** "
        f"| **{total['imagenet_c_ours_ms_per_image']:.1f}** "
        f"| **{total['imagenet_c_reference_ms_per_image']:.1f}** "
        f"| **{total['imagenet_c_speedup']:.1f}×** | | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="speed,fidelity,throughput,memory")
    parser.add_argument("--images", type=int, default=16, help="224 px images (ours: one batch)")
    parser.add_argument("--ref-images", type=int, default=8, help="of those, how many the reference gets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/corruptions.json"))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one memory probe
    parser.add_argument("--memory-shape", default="64,256,512", help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="print the README tables of a result JSON and exit")
    parser.add_argument("--before", type=Path, help="with --render: an earlier result, the 'before' column")
    args = parser.parse_args()
    if args.render:
        before = json.loads(args.before.read_text()) if args.before else None
        sys.stdout.write(render(json.loads(args.render.read_text()), before))
        return
    if args.memory_child:
        memory_child(args.memory_child, *(int(v) for v in args.memory_shape.split(",")))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    ref = load_reference()
    for name in list_corruptions():  # warm-up: cached operators, lazy imports, numba JIT
        corrupt(name, photos(2, 224, 224), 1)
        if ref is not None and name in (*IMAGENET_C, *REFERENCE_EXTRA):
            run_reference(ref, name, to_uint8(photos(1, 224, 224)), 1)
    result: dict = {"benchmark": "corruptions", "threads": args.threads, "environment": environment()}
    if "speed" in parts:
        x = photos(args.images, 224, 224)
        rows = compare(x, ref, args.ref_images, repeats=REPEATS)
        result["speed_224"] = {"batch": len(x), "reference_images": min(args.ref_images, len(x)),
                               "summary": summary(rows), "per_corruption": rows}  # fmt: skip
        log.info("224 px summary: %s", result["speed_224"]["summary"])
    if "fidelity" in parts and ref is not None:
        x = photos(64, 32, 32, seed=3)
        result["fidelity_32"] = {"images": len(x), "per_corruption": compare(x, ref, len(x), repeats=1)}
    if "throughput" in parts:
        sizes = [(32, 32), (224, 224), (256, 512)]
        batch = {(32, 32): 256, (224, 224): 16, (256, 512): 16}
        result["throughput"] = throughput(sizes, batch, ref)
    if "kernels" in parts:
        result["compiled_vs_torch"] = compiled_vs_torch()
    if "memory" in parts:
        result["memory"] = memory(64, 256, 512)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("-> %s", args.out)


if __name__ == "__main__":
    main()
