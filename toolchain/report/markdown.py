"""The human-readable report (report.md) and the short summary printed after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_eps(eps: float) -> str:
    """``0.0156862...`` → ``4/255``: budgets are usually stated in 255ths of the pixel range."""
    in_255ths = eps * 255
    if eps > 0 and abs(in_255ths - round(in_255ths)) < 1e-6:
        return f"{round(in_255ths)}/255"
    return f"{eps:.4g}"


def _attack_label(attack: dict[str, Any]) -> str:
    if attack["mode"] == "black-box":
        budget = f"{attack['queries']:.0f} queries avg"
    else:
        steps = attack.get("steps", 0)
        budget = f"{steps} step" if steps == 1 else f"{steps} steps"
    return f"{attack['name']} {attack['mode']} eps={format_eps(attack['eps'])} ({budget})"


def _precision_label(row: dict[str, Any]) -> str:
    """``int8 (mixed cal.)`` for an INT8 file, else the precision."""
    return row["precision"] + (f" ({row['calibration']} cal.)" if row.get("calibration") else "")


def evaluation_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per evaluation: model, runtime, precision, clean, mean corruption, attacks."""
    rows = []
    for ev in report.get("evaluations", []):
        attacks = "; ".join(f"{_attack_label(a)}: {_pct(a['accuracy'])}" for a in ev.get("attacks", []))
        corr = ev.get("corruptions", {}).get("mean_accuracy")
        rows.append(
            [
                ev["model"],
                ev["runtime"],
                _precision_label(ev),
                _pct(ev["clean_accuracy"]),
                _pct(corr) if corr is not None else "-",
                attacks or "-",
                ", ".join(ev.get("flags", [])) or "-",
            ]
        )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_summary(report: dict[str, Any], run_dir: str | Path) -> str:
    """A few lines for the terminal: reduction, accuracies, latency, gates, where things are."""
    models = report.get("models", {})
    if "engine" in report:
        lines = [f"robustprune validate: {report['engine']['path']} on {report.get('dataset')}"]
    else:
        lines = [
            f"robustprune: {report.get('name')} ({report.get('arch')} on {report.get('dataset')}, "
            f"criterion {report.get('criterion')})"
        ]
    if "dense" in models and "pruned" in models:
        dense, pruned = models["dense"], models["pruned"]
        lines += [
            f"  MACs   {dense['macs'] / 1e6:8.2f} M -> {pruned['macs'] / 1e6:8.2f} M  "
            f"({pruned['macs_reduction']:.2f}x fewer)",
            f"  params {dense['params'] / 1e3:8.1f} k -> {pruned['params'] / 1e3:8.1f} k  "
            f"({pruned['params_reduction']:.2f}x fewer)",
        ]
    for row in evaluation_rows(report):
        model, runtime, precision, clean, corr, attacks, flags = row
        lines.append(f"  {model:6} {runtime:11} {precision}: clean {clean}, corruptions {corr}; {attacks}")
        if flags != "-":
            lines.append(f"         flags: {flags}")
    fp32 = {
        (r["model"], r["runtime"], r["batch"]): r
        for r in report.get("latency", [])
        if r["precision"] == "fp32"
    }
    for _, runtime, batch in sorted(k for k in fp32 if k[0] == "pruned"):
        d, p = fp32.get(("dense", runtime, batch)), fp32[("pruned", runtime, batch)]
        if d:
            lines.append(
                f"  latency {runtime} batch {batch}: dense {d['p50_ms']:.3f} ms, pruned {p['p50_ms']:.3f} ms "
                f"(p50, {d['p50_ms'] / p['p50_ms']:.2f}x faster)"
            )
    for r in report.get("latency", []):
        d, p = fp32.get(("dense", r["runtime"], r["batch"])), fp32.get((r["model"], r["runtime"], r["batch"]))
        if r["precision"] != "fp32" and d and p:
            label = _precision_label(r)
            lines.append(
                f"  latency {r['runtime']} batch {r['batch']}: {r['model']} {label} {r['p50_ms']:.3f} ms "
                f"({p['p50_ms'] / r['p50_ms']:.2f}x vs its fp32, "
                f"{d['p50_ms'] / r['p50_ms']:.2f}x vs dense fp32)"
            )
    for gate in report.get("gates", []):
        value = "missing" if gate["value"] is None else f"{gate['value']:.4g}"
        status = "PASS" if gate["passed"] else "FAIL"
        lines.append(f"  gate {status}: {gate['metric']} {gate['op']} {gate['threshold']:g} (got {value})")
    lines.append(f"  report: {Path(run_dir) / 'report.json'}  ({'passed' if report['passed'] else 'FAILED'})")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], plots: list[Path]) -> str:
    """report.md: the same facts as report.json, for people."""
    parts = [f"# robustprune report: {report.get('name')}", ""]
    parts.append(render_summary(report, ".").replace("\n", "  \n"))
    parts += ["", "## Evaluations", ""]
    header = ["model", "runtime", "precision", "clean", "corruptions (mean)", "attacks", "flags"]
    parts.append(_table(header, evaluation_rows(report)))
    corr_rows = []
    for ev in report.get("evaluations", []):
        c = ev.get("corruptions", {})
        for name, by_sev in c.get("per_corruption", {}).items():
            sev = ", ".join(f"{s}: {_pct(a)}" for s, a in by_sev.items())
            corr_rows.append([ev["model"], ev["runtime"], name, sev])
    if corr_rows:
        parts += [
            "",
            "## Corruptions (accuracy by severity)",
            "",
            _table(["model", "runtime", "corruption", "accuracy"], corr_rows),
        ]
    if report.get("latency"):
        lat = [
            [
                r["model"],
                r["runtime"],
                _precision_label(r),
                str(r["batch"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p90_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['throughput']:.1f}",
            ]
            for r in report["latency"]
        ]
        parts += [
            "",
            "## Latency",
            "",
            _table(["model", "runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"], lat),
        ]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in plots]
    parts += ["", f"Environment: `{report.get('environment')}`", ""]
    return "\n".join(parts)
