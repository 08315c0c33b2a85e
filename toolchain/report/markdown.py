"""The human-readable report (report.md) and the short summary printed after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.report.schema import AttackRow, Evaluation, Report


def pct(value: float | None) -> str:
    """``0.731`` → ``73.1%``; ``None`` → ``n/a``."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_eps(eps: float) -> str:
    """``0.0156862...`` → ``4/255``: budgets are usually stated in 255ths of the pixel range."""
    in_255ths = eps * 255
    if eps > 0 and abs(in_255ths - round(in_255ths)) < 1e-6:
        return f"{round(in_255ths)}/255"
    return f"{eps:.4g}"


def attack_label(attack: AttackRow) -> str:
    """``pgd transfer eps=4/255 (10 steps)``."""
    if attack.mode == "black-box":
        budget = f"{attack.queries:.0f} queries avg"
    else:
        budget = f"{attack.steps} step" if attack.steps == 1 else f"{attack.steps} steps"
    return f"{attack.name} {attack.mode} eps={format_eps(attack.eps)} ({budget})"


def precision_label(row: Any) -> str:
    """``int8 (mixed cal.)`` for an INT8 file, else the precision."""
    calibration = getattr(row, "calibration", None)
    return row.precision + (f" ({calibration} cal.)" if calibration else "")


def robust_label(ev: Evaluation) -> str:
    """Robust accuracy per budget: ``linf 4/255: 55.0% (pgd+square, 100 images)``; for
    segmentation the lowest mIoU per budget: ``linf 4/255: mIoU 31.0% (pgd+segpgd, 50 images)``;
    for detection the mAP of each image's worst attack: ``linf 8/255: mAP 12.0% (...)``."""
    if ev.robust_map:
        return "; ".join(
            f"{r.norm} {format_eps(r.eps)}: mAP {pct(r.map)}, mAP@.5 {pct(r.map50)} "
            f"({'+'.join(r.attacks)}, {r.samples} images)"
            for r in ev.robust_map
        )
    if ev.robust_miou:
        return "; ".join(
            f"{r.norm} {format_eps(r.eps)}: mIoU {pct(r.miou)} ({'+'.join(r.attacks)}, {r.samples} images)"
            for r in ev.robust_miou
        )
    return "; ".join(
        f"{r.norm} {format_eps(r.eps)}: {pct(r.accuracy)} ({'+'.join(r.attacks)}, {r.samples} images)"
        for r in ev.robust_accuracy
    )


def score_label(
    accuracy: float | None, miou: float | None, map_: float | None = None, map50: float | None = None
) -> str:
    """``73.1%``, or ``mIoU 61.0% (pixel acc. 90.2%)`` where an mIoU was measured (segmentation),
    or ``mAP 41.0%, mAP@.5 72.3% (found 80.1%)`` where a mAP was (detection)."""
    if map_ is not None:
        at50 = f", mAP@.5 {pct(map50)}" if map50 is not None else ""
        return f"mAP {pct(map_)}{at50} (found {pct(accuracy)})"
    if miou is None:
        return pct(accuracy) if accuracy is not None else "-"
    return f"mIoU {pct(miou)} (pixel acc. {pct(accuracy)})"


def attack_score(attack: AttackRow) -> str:
    """An attack's accuracy, or for segmentation its mIoU with the same images' clean mIoU, or
    for detection its mAP, the same images' clean mAP and the vanishing rate."""
    if attack.map is not None:
        label = score_label(attack.accuracy, None, attack.map, attack.map50)
        return f"{label}, clean mAP {pct(attack.clean_map)}, vanished {pct(attack.vanishing_rate)}"
    label = score_label(attack.accuracy, attack.miou)
    return label if attack.clean_miou is None else f"{label}, clean {pct(attack.clean_miou)} on these images"


def corruption_label(ev: Evaluation) -> str:
    """Mean corruption score: accuracy, mIoU, or for detection mPC and rPC."""
    corr = ev.corruptions
    if corr.mpc is not None:
        rpc = f", rPC {corr.rpc:.3f}" if corr.rpc is not None else ""
        return f"mPC {pct(corr.mpc)}{rpc} (found {pct(corr.mean_accuracy)})"
    return score_label(corr.mean_accuracy, corr.mean_miou) if corr.mean_accuracy is not None else "-"


def evaluation_rows(report: Report) -> list[list[str]]:
    """One row per evaluation: model, runtime, precision, clean, corruptions, attacks, robust, flags."""
    rows = []
    for ev in report.evaluations:
        attacks = "; ".join(f"{attack_label(a)}: {attack_score(a)}" for a in ev.attacks)
        rows.append(
            [
                ev.model,
                ev.runtime,
                precision_label(ev),
                score_label(ev.clean_accuracy, ev.miou, ev.map, ev.map50),
                corruption_label(ev),
                attacks or "-",
                robust_label(ev) or "-",
                ", ".join(ev.flags) or "-",
            ]
        )
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speedups(report: Report) -> list[tuple[str, int, float, float]]:
    """``(runtime, batch, dense p50 ms, pruned p50 ms)`` wherever both were measured."""
    latency = {(r.model, r.runtime, r.batch): r for r in report.latency if r.precision == "fp32"}
    rows = []
    for _, runtime, batch in sorted(k for k in latency if k[0] == "pruned"):
        dense = latency.get(("dense", runtime, batch))
        if dense:
            rows.append((runtime, batch, dense.p50_ms, latency[("pruned", runtime, batch)].p50_ms))
    return rows


def speed_change(dense_ms: float, pruned_ms: float) -> str:
    """``1.41x faster`` or, when pruning did not pay, ``1.25x slower``."""
    if pruned_ms <= dense_ms:
        return f"{dense_ms / pruned_ms:.2f}x faster" if pruned_ms > 0 else "n/a"
    return f"{pruned_ms / dense_ms:.2f}x slower"


def render_summary(report: Report, run_dir: str | Path) -> str:
    """A few lines for the terminal: reduction, accuracies, latency, gates, where things are."""
    models = report.models
    if report.engine is not None:
        lines = [f"robustprune validate: {report.engine.path} on {report.dataset}"]
    else:
        lines = [
            f"robustprune: {report.name} ({report.arch} on {report.dataset}, criterion {report.criterion})"
        ]
    if models.dense and models.pruned:
        dense, pruned = models.dense, models.pruned
        lines += [
            f"  MACs   {dense.macs / 1e6:8.2f} M -> {pruned.macs / 1e6:8.2f} M  "
            f"({pruned.macs_reduction:.2f}x fewer)",
            f"  params {dense.params / 1e3:8.1f} k -> {pruned.params / 1e3:8.1f} k  "
            f"({pruned.params_reduction:.2f}x fewer)",
        ]
    for row in evaluation_rows(report):
        model, runtime, precision, clean, corr, attacks, robust, flags = row
        lines.append(f"  {model:6} {runtime:11} {precision}: clean {clean}, corruptions {corr}; {attacks}")
        if robust != "-":
            lines.append(f"         robust accuracy: {robust}")
        if flags != "-":
            lines.append(f"         flags: {flags}")
    for runtime, batch, dense_ms, pruned_ms in speedups(report):
        lines.append(
            f"  latency {runtime} batch {batch}: dense {dense_ms:.3f} ms, pruned {pruned_ms:.3f} ms "
            f"(p50, {speed_change(dense_ms, pruned_ms)})"
        )
    fp32 = {(r.model, r.runtime, r.batch): r for r in report.latency if r.precision == "fp32"}
    for r in report.latency:
        dense_row, own = fp32.get(("dense", r.runtime, r.batch)), fp32.get((r.model, r.runtime, r.batch))
        if r.precision != "fp32" and dense_row and own:
            lines.append(
                f"  latency {r.runtime} batch {r.batch}: {r.model} {precision_label(r)} {r.p50_ms:.3f} ms "
                f"({own.p50_ms / r.p50_ms:.2f}x vs its fp32, "
                f"{dense_row.p50_ms / r.p50_ms:.2f}x vs dense fp32)"
            )
    for intrinsic in report.intrinsic_gates:
        status = "PASS" if intrinsic.passed else "FAIL"
        lines.append(f"  check {status}: {intrinsic.name} ({intrinsic.detail})")
    for gate in report.gates:
        value = "missing" if gate.value is None else f"{gate.value:.4g}"
        status = "PASS" if gate.passed else "FAIL"
        lines.append(f"  gate {status}: {gate.metric} {gate.op} {gate.threshold:g} (got {value})")
    verdict = "passed" if report.passed else "FAILED"
    lines.append(f"  report: {Path(run_dir) / 'report.html'}  ({verdict}; report.json beside it)")
    return "\n".join(lines)


def render_markdown(report: Report, plots: list[Path]) -> str:
    """report.md: the same facts as report.json, for people."""
    parts = [f"# robustprune report: {report.name}", ""]
    parts.append(render_summary(report, ".").replace("\n", "  \n"))
    parts += ["", "## Evaluations", ""]
    header = [
        "model",
        "runtime",
        "precision",
        "clean",
        "corruptions (mean)",
        "attacks",
        "robust accuracy",
        "flags",
    ]
    parts.append(table(header, evaluation_rows(report)))
    corr_rows = []
    for ev in report.evaluations:
        corr = ev.corruptions
        for name, by_sev in (
            corr.per_corruption_map or corr.per_corruption_miou or corr.per_corruption or {}
        ).items():
            sev = ", ".join(f"{s}: {pct(a)}" for s, a in by_sev.items())
            corr_rows.append([ev.model, ev.runtime, name, sev])
    if corr_rows:
        metric = "accuracy"
        if any(ev.corruptions.per_corruption_miou for ev in report.evaluations):
            metric = "mIoU"
        if any(ev.corruptions.per_corruption_map for ev in report.evaluations):
            metric = "mAP"
        parts += ["", f"## Corruptions ({metric} by severity)", ""]
        parts.append(table(["model", "runtime", "corruption", metric], corr_rows))
    iou_rows = [
        [ev.model, ev.runtime, name, pct(iou)]
        for ev in report.evaluations
        for name, iou in (ev.per_class_iou or {}).items()
    ]
    if iou_rows:
        parts += ["", "## IoU per class (clean)", ""]
        parts.append(table(["model", "runtime", "class", "IoU"], iou_rows))
    ap_rows = [
        [ev.model, ev.runtime, precision_label(ev), name, pct(ap), pct((ev.per_class_recall or {}).get(name))]
        for ev in report.evaluations
        for name, ap in (ev.per_class_ap or {}).items()
    ]
    if ap_rows:
        parts += ["", "## AP per class (clean, COCO AP@[.5:.95] and AR@100)", ""]
        parts.append(table(["model", "runtime", "precision", "class", "AP", "recall"], ap_rows))
    if report.latency:
        lat = [
            [
                r.model,
                r.runtime,
                precision_label(r),
                str(r.batch),
                f"{r.p50_ms:.3f}",
                f"{r.p90_ms or 0:.3f}",
                f"{r.p99_ms or 0:.3f}",
                f"{r.throughput or 0:.1f}",
            ]
            for r in report.latency
        ]
        parts += ["", "## Latency", ""]
        parts.append(
            table(["model", "runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"], lat)
        )
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in plots]
    parts += ["", f"Environment: `{report.environment.to_json()}`", ""]
    return "\n".join(parts)
