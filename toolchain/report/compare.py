"""``robustprune compare A B``: two reports side by side (two releases, or two methods).

Each report is flattened into named facts (sizes, accuracies per evaluation and attack,
robust accuracy per budget, latency, gates, verdict); facts are matched by name, and numbers
get a difference ``B - A`` (in points for accuracies). A fact only one report has shows
``-`` on the other side.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.report.markdown import format_eps, table
from toolchain.report.schema import Evaluation, Report


@dataclass(frozen=True)
class Fact:
    """One comparable value; ``kind`` says how to print it and its difference."""

    value: float | str | None
    kind: str  # "pct" (accuracy), "x" (factor), "ms", "M" (millions), "k" (thousands), "text"


def _facts(report: Report) -> dict[str, Fact]:
    facts: dict[str, Fact] = {"verdict": Fact("passed" if report.passed else "FAILED", "text")}
    facts["status"] = Fact(report.status or "unknown", "text")
    dense, pruned = report.models.dense, report.models.pruned
    if dense:
        facts["dense MACs"] = Fact(dense.macs / 1e6, "M")
        facts["dense params"] = Fact(dense.params / 1e3, "k")
    if pruned:
        facts["pruned MACs"] = Fact(pruned.macs / 1e6, "M")
        facts["pruned params"] = Fact(pruned.params / 1e3, "k")
        facts["MACs reduction"] = Fact(pruned.macs_reduction, "x")
        facts["params reduction"] = Fact(pruned.params_reduction, "x")
        facts["pruning target met"] = Fact(
            {True: "yes", False: "NO", None: "unknown"}[pruned.target_met], "text"
        )
    for ev in report.evaluations:
        where = f"{ev.model}/{ev.runtime}/{ev.precision}"
        facts[f"{where} clean"] = Fact(ev.clean_accuracy, "pct")
        if ev.corruptions.mean_accuracy is not None:
            facts[f"{where} corruptions mean"] = Fact(ev.corruptions.mean_accuracy, "pct")
        if ev.corruptions.relative_mce is not None:
            facts[f"{where} relative mCE"] = Fact(ev.corruptions.relative_mce, "x")
        for a in ev.attacks:
            facts[f"{where} {a.name} {a.mode} {a.norm} {format_eps(a.eps)}"] = Fact(a.accuracy, "pct")
        for r in ev.robust_accuracy:
            facts[f"{where} robust {r.norm} {format_eps(r.eps)}"] = Fact(r.accuracy, "pct")
        _segmentation_facts(facts, where, ev)
        if ev.parity is not None:
            facts[f"{where} top-1 agreement with torch"] = Fact(ev.parity.top1_agreement, "pct")
        facts[f"{where} flags"] = Fact(", ".join(ev.flags) or "none", "text")
    for row in report.latency:
        facts[f"p50 {row.model}/{row.runtime}/{row.precision} batch {row.batch}"] = Fact(row.p50_ms, "ms")
    for gate in report.intrinsic_gates:
        facts[f"check {gate.name}"] = Fact("PASS" if gate.passed else "FAIL", "text")
    for g in report.gates:
        facts[f"gate {g.metric} {g.op} {g.threshold:g}"] = Fact("PASS" if g.passed else "FAIL", "text")
    return facts


def _segmentation_facts(facts: dict[str, Fact], where: str, ev: Evaluation) -> None:
    """mIoU clean, under corruptions, per attack and per budget (absent for classification)."""
    if ev.miou is not None:
        facts[f"{where} clean mIoU"] = Fact(ev.miou, "pct")
    if ev.corruptions.mean_miou is not None:
        facts[f"{where} corruptions mean mIoU"] = Fact(ev.corruptions.mean_miou, "pct")
    for a in ev.attacks:
        if a.miou is not None:
            facts[f"{where} {a.name} {a.mode} {a.norm} {format_eps(a.eps)} mIoU"] = Fact(a.miou, "pct")
    for r in ev.robust_miou or []:
        facts[f"{where} robust mIoU {r.norm} {format_eps(r.eps)}"] = Fact(r.miou, "pct")


def _show(fact: Fact | None) -> str:
    if fact is None or fact.value is None:
        return "-"
    if isinstance(fact.value, str):
        return fact.value
    return {
        "pct": f"{100 * fact.value:.1f}%",
        "x": f"{fact.value:.2f}x",
        "ms": f"{fact.value:.3f} ms",
        "M": f"{fact.value:.2f} M",
        "k": f"{fact.value:.1f} k",
    }[fact.kind]


def _delta(a: Fact | None, b: Fact | None) -> str:
    if a is None or b is None or not isinstance(a.value, float | int) or not isinstance(b.value, float | int):
        return "" if a is None or b is None or a.value == b.value else "changed"
    d = b.value - a.value
    if a.kind == "pct":
        return f"{100 * d:+.1f} pts"
    if a.kind == "ms" and a.value:
        return f"{d:+.3f} ms ({b.value / a.value:.2f}x)"
    return f"{d:+.3g}"


def comparison_rows(a: Report, b: Report) -> list[list[str]]:
    """``[fact, A, B, B - A]`` for every fact either report has, in A's order then B's."""
    fa, fb = _facts(a), _facts(b)
    names = list(fa) + [n for n in fb if n not in fa]
    return [[n, _show(fa.get(n)), _show(fb.get(n)), _delta(fa.get(n), fb.get(n))] for n in names]


def render_comparison(a: Report, b: Report, labels: tuple[str, str], fmt: str = "text") -> str:
    """The comparison as an aligned terminal table (``text``) or a Markdown table (``md``)."""
    header = ["", labels[0], labels[1], "B - A"]
    rows = comparison_rows(a, b)
    if fmt == "md":
        return table(header, rows)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(out)
