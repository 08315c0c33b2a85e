"""The documentation's rendered blocks: each function reads JSON from ``bench/results/`` and
returns the Markdown that stands between ``<!-- render:NAME -->`` markers (see
``bench/render_docs.py``). Pipeline runs here: the quickstarts, the method comparison and the
model zoo; :mod:`renderers_perf` holds corruptions, attacks and latency.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aer  # noqa: E402
import zoo  # noqa: E402

RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a block renderer under ``name``."""

    def add(fn: Callable[[], str]) -> Callable[[], str]:
        if name in RENDERERS:
            raise ValueError(f"renderer {name!r} registered twice")
        RENDERERS[name] = fn
        return fn

    return add


@cache
def load(name: str) -> Any:
    """A result JSON of ``bench/results/``."""
    return json.loads((RESULTS / name).read_text())


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def times(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}×"


def source(*names: str) -> str:
    files = ", ".join(f"`bench/results/{n}`" for n in names)
    return f"*Source: {files}.*"


# --- classification quickstart ----------------------------------------------------------------


@renderer("quickstart.printed")
def quickstart_printed() -> str:
    q = load("quickstart.json")
    return f"```text\n$ {q['command']}\n{q['printed'].rstrip()}\n```"


@renderer("quickstart.headline")
def quickstart_headline() -> str:
    q = load("quickstart.json")
    speed = q["onnxruntime_p50_speedup_pruned_vs_dense"]
    return (
        f"{q['wall_seconds']:.0f} s on 2 CPU cores, {times(q['macs_reduction'])} fewer MACs, "
        f"pruned ONNX Runtime FP32 {times(speed['batch_1'])} faster than dense at batch 1"
    )


@renderer("quickstart.details")
def quickstart_details() -> str:
    q = load("quickstart.json")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in q["stage_seconds"].items() if v)
    rows = [
        "| model | runtime | precision | clean | PGD transfer / white-box | corruptions mean |",
        "|---|---|---|---|---|---|",
    ]
    for key, acc in q["accuracy"].items():
        model, runtime, precision, *calibration = key.split("/")
        attack = next((v for k, v in acc.items() if k.startswith("pgd/")), None)
        label = precision + (f" ({calibration[0]}-calibrated)" if calibration else "")
        rows.append(
            f"| {model} | {runtime} | {label} | {pct(acc['clean'])} | {pct(attack)} | {pct(acc['corruptions_mean'])} |"
        )
    speed = q["onnxruntime_p50_speedup_pruned_vs_dense"]
    int8 = q["onnxruntime_p50_speedup_int8"]
    lines = [
        f"Wall time {q['wall_seconds']:.1f} s (stages: {stages}); MACs {times(q['macs_reduction'])} fewer, "
        f"parameters {times(q['params_reduction'])} fewer; ONNX Runtime p50 pruned vs dense FP32: "
        + ", ".join(f"{times(v)} at {k.replace('_', ' ')}" for k, v in speed.items())
        + (
            "; INT8 vs the pruned FP32 file: "
            + ", ".join(
                f"{times(v['vs_pruned_fp32'])} ({k.replace('/batch_', ', batch ')})" for k, v in int8.items()
            )
            if int8
            else ""
        )
        + ".",
        "",
        *rows,
        "",
        source("quickstart.json"),
    ]
    return "\n".join(lines)


# --- segmentation -----------------------------------------------------------------------------


def _segmentation_row(name: str, run: dict[str, Any]) -> str:
    ort = run["onnxruntime_fp32"]
    p50 = run["onnxruntime_p50_ms_batch_1"]
    return (
        f"| {name} | {run['wall_seconds']:.1f} | {times(run['macs_reduction'])} | "
        f"{pct(ort['dense']['clean_miou'])} → {pct(ort['pruned']['clean_miou'])} | "
        f"{pct(ort['dense']['corruptions_mean_miou'])} → {pct(ort['pruned']['corruptions_mean_miou'])} | "
        f"{pct(ort['dense']['pgd_transfer_miou'])} → {pct(ort['pruned']['pgd_transfer_miou'])} | "
        f"{pct(ort['dense']['segpgd_transfer_miou'])} → {pct(ort['pruned']['segpgd_transfer_miou'])} | "
        f"{p50['dense']:.2f} → {p50['pruned']:.2f} ({times(run['onnxruntime_p50_speedup_batch_1'])}) | "
        f"{pct(run['export_parity']['pruned']['top1_agreement'])} |"
    )


@renderer("segmentation.table")
def segmentation_table() -> str:
    s = load("segmentation.json")
    lines = [
        "| run | seconds (stage sum) | MACs ↓ | clean mIoU dense → pruned | corruptions mIoU | "
        "PGD transfer mIoU | SegPGD transfer mIoU | ORT p50 ms, batch 1 | export parity (pixels) |",
        "|---|---|---|---|---|---|---|---|---|",
        _segmentation_row("quickstart (`segnet`, 256 × 128)", s["quickstart"]),
        _segmentation_row("LR-ASPP MobileNetV3-Large, 512 × 256 (shortened)", s["lraspp_512x256"]),
        "",
        source("segmentation.json"),
    ]
    return "\n".join(lines)


@renderer("segmentation.classes")
def segmentation_classes() -> str:
    ort = load("segmentation.json")["quickstart"]["onnxruntime_fp32"]
    dense, pruned = ort["dense"]["per_class_iou"], ort["pruned"]["per_class_iou"]
    header = "| model | " + " | ".join(dense) + " |"
    rows = [header, "|---|" + "---|" * len(dense)]
    for name, ious in (("dense", dense), ("pruned", pruned)):
        rows.append(f"| {name} | " + " | ".join(pct(v, 0) for v in ious.values()) + " |")
    return "\n".join(rows)


# --- detection --------------------------------------------------------------------------------


def _detection_row(name: str, run: dict[str, Any]) -> str:
    ort = run["onnxruntime_fp32"]
    lat = run["onnxruntime_batch_1"]
    d, p = ort["dense"], ort["pruned"]

    def pair(key: str) -> str:
        return f"{pct(d[key])} → {pct(p[key])}"

    def ms(model: str) -> str:
        row = lat[model]
        return f"{row['network_p50_ms']:.2f} + {row['postprocess_p50_ms']:.2f}"

    def rpc(value: float | None) -> str:
        return "n/a (clean mAP 0)" if value is None else f"{value:.3f}"

    return (
        f"| {name} | {run['wall_seconds']:.1f} | {times(run['macs_reduction'])} | {pair('clean_map50')} | "
        f"{pair('clean_map')} | {pair('mpc')} | {rpc(d['rpc'])} → {rpc(p['rpc'])} | "
        f"{pair('pgd_transfer_map50')} | {pair('tog-vanishing_transfer_map50')} | "
        f"{pair('tog-vanishing_transfer_vanishing_rate')} | {ms('dense')} → {ms('pruned')} | "
        f"{pct(run['export_parity']['pruned']['top1_agreement'])} |"
    )


@renderer("detection.table")
def detection_table() -> str:
    s = load("detection.json")
    rows = [
        "| run | seconds | MACs ↓ | clean mAP@.5 dense → pruned | clean mAP | mPC | rPC | "
        "PGD transfer mAP@.5 | TOG-vanishing transfer mAP@.5 | TOG vanishing rate | "
        "ORT p50 ms, batch 1 (network + NMS) | export parity (detections) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = (
        ("quickstart", "quickstart (`detnet` width 0.5, 256 × 128)"),
        ("ssdlite_320", "SSDlite MobileNetV3, 320 × 160 (one pruning step)"),
    )
    rows += [_detection_row(label, s[key]) for key, label in names if key in s]
    return "\n".join([*rows, "", source("detection.json")])


@renderer("detection.classes")
def detection_classes() -> str:
    ort = load("detection.json")["quickstart"]["onnxruntime_fp32"]
    dense, pruned = ort["dense"]["per_class_ap"], ort["pruned"]["per_class_ap"]
    rows = ["| model | " + " | ".join(dense) + " |", "|---|" + "---|" * len(dense)]
    for name, aps in (("dense", dense), ("pruned", pruned)):
        rows.append(f"| {name} | " + " | ".join(pct(v, 0) for v in aps.values()) + " |")
    return "\n".join(rows)


@renderer("detection.selection")
def detection_selection() -> str:
    sel = load("detection.json")["holdout_selection"]
    rows = [
        "| MACs target | fine-tune epochs | MACs ↓ | held-out mAP@.5 dense → pruned | mAP | rPC |",
        "|---|---|---|---|---|---|",
    ]
    for c in sel["candidates"]:
        chosen = (c["macs_target"], c["finetune_epochs"]) == tuple(sel["chosen"].values())
        mark = " (chosen)" if chosen else ""
        rows.append(
            f"| {c['macs_target']:g}×{mark} | {c['finetune_epochs']} | {times(c['macs_reduction'])} | "
            f"{pct(c['holdout_map50']['dense'])} → {pct(c['holdout_map50']['pruned'])} | "
            f"{pct(c['holdout_map']['dense'])} → {pct(c['holdout_map']['pruned'])} | "
            f"{c['holdout_rpc']['dense']:.3f} → {c['holdout_rpc']['pruned']:.3f} |"
        )
    return "\n".join([*rows, "", source("detection.json")])


@renderer("detection.metrics")
def detection_metrics() -> str:
    m = load("detection.json")["metrics"]
    ours, ref = m["ours"], m["pycocotools"]
    return (
        f"On {m['images']} images of random detections (crowd regions included), our mAP@[.5:.95] "
        f"{ours['map']:.6f}, mAP@.5 {ours['map50']:.6f} and mAP@.75 {ours['map75']:.6f} equal pycocotools' "
        f"(largest difference {m['max_abs_difference']:.1e}); it took {ours['seconds']:.1f} s against "
        f"pycocotools' {ref['seconds']:.1f} s, with nothing to install.\n\n{source('detection.json')}"
    )


# --- method comparison (bench/aer.py) ---------------------------------------------------------


@renderer("aer.full")
def aer_full() -> str:
    name = "aer-fashion-mnist-full-test-matrix.json"
    return aer.render_table(load(name)) + "\n\n" + source(name)


@renderer("aer.reduced")
def aer_reduced() -> str:
    name = "aer-fashion-mnist-reduced-test.json"
    payload = load(name)
    return (
        f"Wall time {payload['wall_seconds'] / 60:.1f} min, dense model included.\n\n"
        + aer.render_table(payload)
        + "\n\n"
        + source(name)
    )


@renderer("aer.signs")
def aer_signs() -> str:
    name = "aer-signs-reduced-test.json"
    return aer.render_table(load(name)) + "\n\n" + source(name)


@renderer("aer.seeds")
def aer_seeds() -> str:
    """PGD-20 difference to magnitude at 4x, paired by seed (same dense model, same images)."""
    runs = load("aer-fashion-mnist-full-test-x4-seeds.json")["runs"]
    by = {(r["method"], r["seed"]): r["pgd20"] for r in runs if r["budget"] == 4}
    seeds = sorted({s for m, s in by if m == "magnitude"})
    magnitude = [by[("magnitude", s)] for s in seeds]
    diffs = {}
    for method in sorted({m for m, _ in by} - {"magnitude"}):
        paired = [by[(method, s)] - by[("magnitude", s)] for s in seeds if (method, s) in by]
        if len(paired) > 1:
            diffs[method] = (statistics.fmean(paired), statistics.stdev(paired))
    ranked = sorted(diffs.items(), key=lambda kv: -kv[1][0])
    return (
        f"`magnitude` at 4× scored {', '.join(pct(v) for v in magnitude)} PGD-20 over seeds "
        f"{', '.join(str(s) for s in seeds)}; paired by seed, the PGD-20 difference to it is "
        + ", ".join(f"`{m}` {pts(mu)} ± {100 * sd:.1f}" for m, (mu, sd) in ranked)
        + " points"
    )


@renderer("aer.best")
def aer_best() -> str:
    """Per budget: the best method by PGD-20 and where magnitude stands."""
    payload = load("aer-fashion-mnist-full-test-matrix.json")
    dense = payload["dense_summary"]
    rows = ["| budget | best by PGD-20 (Δ clean / Δ PGD-20) | `magnitude` (Δ clean / Δ PGD-20) | methods |"]
    rows.append("|---|---|---|---|")
    budgets = sorted({r["budget"] for r in payload["summary"].values()})
    for budget in budgets:
        here = [r for r in payload["summary"].values() if r["budget"] == budget]
        best = max(here, key=lambda r: r["pgd20"])
        mag = next((r for r in here if r["method"] == "magnitude"), None)

        def deltas(r: dict[str, Any]) -> str:
            return f"{pts(r['clean'] - dense['clean'])} / {pts(r['pgd20'] - dense['pgd20'])}"

        rows.append(
            f"| {budget:g}× | `{best['method']}` ({deltas(best)}) | {deltas(mag) if mag else '–'} | {len(here)} |"
        )
    return "\n".join(rows)


@renderer("aer.holdout")
def aer_holdout() -> str:
    payload = load("aer-fashion-mnist-full-holdout.json")
    dense = payload["dense_summary"]
    rows = sorted(payload["summary"].values(), key=lambda r: -r["pgd20"])
    return "; ".join(
        f"`{r['method']}` {pts(r['clean'] - dense['clean'])} / {pts(r['pgd20'] - dense['pgd20'])}"
        for r in rows
    )


def _goals_block(name: str) -> Callable[[], str]:
    """A goal-verdict table (bench/aer.py's ``render_goals``) of one result, with its source."""
    return lambda: aer.render_goals(load(name)) + "\n\n" + source(name)


for _block, _result in {
    "aer.holdout-losses": "aer-fashion-mnist-full-holdout-losses.json",
    "aer.holdout-a8": "aer-fashion-mnist-full-holdout-a8.json",
    "aer.goals": "aer-fashion-mnist-full-test-goals.json",
    "aer.signs-goals": "aer-signs-full-test-goals.json",
    "aer.signs-holdout": "aer-signs-full-holdout.json",
    "aer.signs-holdout-losses": "aer-signs-full-holdout-losses.json",
}.items():
    renderer(_block)(_goals_block(_result))


@renderer("aer.anchor")
def aer_anchor() -> str:
    name = "aer-fashion-mnist-full-test-anchor.json"
    return aer.render_reference(load(name)) + "\n\n" + source(name)


@renderer("aer.recommend")
def aer_recommend() -> str:
    fashion, signs = (load(f"aer-{d}-full-test-goals.json") for d in ("fashion-mnist", "signs"))
    return (
        f"on Fashion-MNIST's test split, {aer.render_verdicts(fashion)}; on `signs`, "
        f"{aer.render_verdicts(signs)}"
    )


@renderer("dense-lr")
def dense_lr() -> str:
    name = "dense-lr-fashion-mnist-holdout.json"
    payload = load(name)
    rows = ["| one-cycle peak lr | clean | PGD-20 | training s |", "|---|---|---|---|"]
    for r in payload["runs"]:
        rows.append(f"| {r['lr']:g} | {pct(r['clean'])} | {pct(r['pgd20'])} | {r['train_seconds']} |")
    return "\n".join([*rows, "", source(name)])


@renderer("dense-gap")
def dense_gap() -> str:
    name = "dense_gap.json"
    payload = load(name)
    rows = [
        "| training | clean | PGD-20, the project's attack | PGD-20, the script's attack |",
        "|---|---|---|---|",
    ]
    for r in payload["runs"]:
        if r["side"] == "anchor":
            rows.append(f"| plain script | {pct(r['clean'])} | – | {pct(r['pgd20'])} |")
            continue
        how = "project" + ("" if r["cycle_momentum"] else ", momentum fixed (before `cycle_momentum`)")
        if r.get("train_attack") == "unprojected":
            how += ", trained with the script's attack"
        rows.append(f"| {how} | {pct(r['clean'])} | {pct(r['pgd20'])} | {pct(r['pgd20_unprojected'])} |")
    return "\n".join([*rows, "", source(name)])


@renderer("distill-finetune")
def distill_finetune() -> str:
    name = "distill-finetune-fashion-mnist.json"
    runs = {r["model"]: r for r in load(name)["runs"]}
    dense = runs["dense"]
    rows = [
        "| model | clean | PGD-20 | corruptions | Δ clean / Δ PGD-20 against dense |",
        "|---|---|---|---|---|",
        f"| dense | {pct(dense['clean'])} | {pct(dense['pgd20'])} | {pct(dense['corruptions'])} | |",
    ]
    for key, r in runs.items():
        if key != "dense":
            deltas = f"{pts(r['clean'] - dense['clean'])} / {pts(r['pgd20'] - dense['pgd20'])}"
            rows.append(
                f"| `magnitude` {times(dense['macs_reduction'])}, fine-tuned with `{r['loss']}` | {pct(r['clean'])} "
                f"| {pct(r['pgd20'])} | {pct(r['corruptions'])} | {deltas} |"
            )
    return "\n".join([*rows, "", source(name)])


# --- model zoo --------------------------------------------------------------------------------


@renderer("zoo.table")
def zoo_table() -> str:
    payload = load("zoo.json")
    return zoo.table(payload["results"]) + "\n\n" + zoo.summary_line(payload) + ".\n\n" + source("zoo.json")


@renderer("zoo.summary")
def zoo_summary() -> str:
    return zoo.summary_line(load("zoo.json"))


@renderer("zoo.extremes")
def zoo_extremes() -> str:
    results = load("zoo.json")["results"]
    failed = [r for r in results if r["outcome"] != "works"]
    heaviest = max(results, key=lambda r: r["peak_rss_bytes"])
    slowest = max(results, key=lambda r: r["seconds"])
    failures = ", ".join(
        f"`{r['model']}` ({r['outcome']} at {r.get('stage') or 'preflight'})" for r in failed
    )
    return (
        f"{len(failed)} failure{'s' if len(failed) != 1 else ''}: {failures or 'none'}. "
        f"Largest peak RSS {heaviest['peak_rss_bytes'] / 2**30:.2f} GiB (`{heaviest['model']}`), "
        f"longest trial {slowest['seconds']:.0f} s (`{slowest['model']}`)"
    )


import renderers_perf  # noqa: E402, F401  (registers the performance renderers)
