"""report.html: one self-contained page (inline CSS, plots embedded as data URIs, no script,
no external reference), readable offline and attachable to a release as it is."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from toolchain.report.markdown import (
    attack_label,
    attack_score,
    format_eps,
    pct,
    speed_change,
    speedups,
)
from toolchain.report.schema import Evaluation, Report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d232a; padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { display: inline-block; padding: 0.2em 0.8em; border-radius: 0.3em; font-weight: bold;
           color: white; }
.pass { background: #1a7f37; } .fail { background: #cf222e; }
td.pass, td.fail { color: white; font-weight: bold; text-align: center; }
.meta { color: #57606a; font-size: 0.9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; }
"""

_CAPTIONS = {
    "accuracy": "Clean, attack and corruption accuracy per evaluation.",
    "corruptions": "Accuracy against corruption severity (0 = clean): dense dashed, pruned solid.",
    "robust_eps": "Robust accuracy against eps: images correct clean that survive every attack at that eps.",
    "tradeoff": "Accuracy against MACs and latency, dense and pruned, on the deployed runtime.",
    "channels": "Output channels per layer, before and after pruning.",
}


def _cell(text: object, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{escape(str(text))}</td>"


def _table(header: list[str], rows: list[list[str]], table_id: str = "", numeric_from: int = 99) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            cls = (
                "pass"
                if value == "PASS"
                else "fail"
                if value == "FAIL"
                else "num"
                if i >= numeric_from
                else ""
            )
            cells.append(_cell(value, cls))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(report: Report) -> str:
    rows: list[list[str]] = []
    dense, pruned = report.models.dense, report.models.pruned
    if dense and pruned:
        rows.append(
            [
                "MACs",
                f"{dense.macs / 1e6:.2f} M",
                f"{pruned.macs / 1e6:.2f} M",
                f"{pruned.macs_reduction:.2f}x",
            ]
        )
        rows.append(
            [
                "params",
                f"{dense.params / 1e3:.1f} k",
                f"{pruned.params / 1e3:.1f} k",
                f"{pruned.params_reduction:.2f}x",
            ]
        )
        target = ", ".join(f"{k} {v:g}" for k, v in (pruned.target or {}).items()) or "none recorded"
        met = {True: "met", False: "MISSED", None: "unknown"}[pruned.target_met]
        tolerance = f" (tolerance {pruned.tolerance:g})" if pruned.tolerance is not None else ""
        rows.append(["pruning target", target + tolerance, "", met])
    for runtime, batch, dense_ms, pruned_ms in speedups(report):
        rows.append(
            [
                f"p50 latency, {runtime}, batch {batch}",
                f"{dense_ms:.3f} ms",
                f"{pruned_ms:.3f} ms",
                speed_change(dense_ms, pruned_ms),
            ]
        )
    rows.append(["verdict", "", "", "PASS" if report.passed else "FAIL"])
    return _table(["", "dense", "pruned", "change"], rows, "summary", numeric_from=1)


def _gates(report: Report) -> str:
    rows = [
        ["intrinsic", g.name, "", "", "PASS" if g.passed else "FAIL", g.detail]
        for g in report.intrinsic_gates
    ]
    for g in report.gates:
        value = "missing" if g.value is None else f"{g.value:.4g}"
        rule = f"{g.op} {g.threshold:g}" + (f" ({g.relative} vs baseline)" if g.relative else "")
        rows.append(["recipe", g.metric, rule, value, "PASS" if g.passed else "FAIL", g.error or ""])
    return _table(["kind", "gate", "rule", "value", "result", "detail"], rows, "gates")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _evaluation(ev: Evaluation) -> str:
    title = f"{ev.model} / {ev.runtime} / {ev.precision} ({ev.device}, {ev.samples} images)"
    c = ev.corruptions
    parity = (
        "none (no PyTorch reference)"
        if ev.parity is None
        else f"top-1 agreement {pct(ev.parity.top1_agreement)}, max |dlogit| "
        + ("NaN/Inf" if ev.parity.max_abs_diff is None else f"{ev.parity.max_abs_diff:.2e}")
    )
    facts = [
        ["clean accuracy", pct(ev.clean_accuracy)],
        ["corruptions (mean)", pct(c.mean_accuracy)],
        ["mCE / relative mCE", f"{_num(c.mce)} / {_num(c.relative_mce)}"],
    ]
    if ev.map is not None:  # detection: COCO mAP, corruptions as mPC/rPC, mCE on mAP
        facts = [
            ["clean mAP@[.5:.95] / mAP@.5 / mAP@.75", f"{pct(ev.map)} / {pct(ev.map50)} / {pct(ev.map75)}"],
            ["objects found (score >= 0.3, IoU >= 0.5)", pct(ev.clean_accuracy)],
            ["corruptions: mPC / rPC", f"{pct(c.mpc)} / {_num(c.rpc)}"],
            ["mCE / relative mCE (on mAP)", f"{_num(c.mce)} / {_num(c.relative_mce)}"],
        ]
    elif ev.miou is not None:  # segmentation: accuracies are per pixel, mCE is on mIoU
        facts = [
            ["clean mIoU", pct(ev.miou)],
            ["clean pixel accuracy", pct(ev.pixel_accuracy)],
            ["corruptions (mean mIoU)", pct(c.mean_miou)],
            ["mCE / relative mCE (on mIoU)", f"{_num(c.mce)} / {_num(c.relative_mce)}"],
        ]
    facts += [
        [
            "parity with PyTorch"
            + (" (per pixel)" if ev.miou is not None else " (detections)" if ev.map is not None else ""),
            parity,
        ],
        [
            "images with NaN/Inf logits",
            "not recorded" if ev.nonfinite_logits is None else str(ev.nonfinite_logits),
        ],
        ["flags", ", ".join(ev.flags) or "none"],
    ]
    parts = [f"<h3>{escape(title)}</h3>", _table(["metric", "value"], facts)]
    if ev.attacks:
        rows = [
            [
                a.name,
                a.mode,
                a.norm,
                format_eps(a.eps),
                attack_label(a),
                str(a.samples),
                attack_score(a),
            ]
            for a in ev.attacks
        ]
        parts.append(
            _table(["attack", "mode", "norm", "eps", "budget", "images", "accuracy"], rows, numeric_from=5)
        )
    if ev.robust_miou:
        rows = [
            [r.norm, format_eps(r.eps), " + ".join(r.attacks), str(r.samples), pct(r.miou)]
            for r in ev.robust_miou
        ]
        parts.append(_table(["norm", "eps", "lowest over", "images", "robust mIoU"], rows, numeric_from=3))
    if ev.per_class_iou:
        rows = [[name, pct(iou)] for name, iou in ev.per_class_iou.items()]
        parts.append(_table(["class", "IoU (clean)"], rows, numeric_from=1))
    if ev.robust_map:
        rows = [
            [r.norm, format_eps(r.eps), " + ".join(r.attacks), str(r.samples), pct(r.map), pct(r.map50)]
            for r in ev.robust_map
        ]
        parts.append(
            _table(["norm", "eps", "worst per image over", "images", "mAP", "mAP@.5"], rows, numeric_from=3)
        )
    if ev.per_class_ap:
        recall = ev.per_class_recall or {}
        rows = [[name, pct(ap), pct(recall.get(name))] for name, ap in ev.per_class_ap.items()]
        parts.append(_table(["class", "AP (clean)", "recall"], rows, numeric_from=1))
    if ev.robust_accuracy:
        rows = [
            [r.norm, format_eps(r.eps), " + ".join(r.attacks), str(r.samples), pct(r.accuracy)]
            for r in ev.robust_accuracy
        ]
        parts.append(
            _table(["norm", "eps", "worst case over", "images", "robust accuracy"], rows, numeric_from=3)
        )
    if ev.skipped:
        parts.append(
            "<p class='meta'>Skipped: "
            + escape("; ".join(f"{s.name} ({s.reason})" for s in ev.skipped))
            + "</p>"
        )
    return "\n".join(parts)


def _corruption_table(report: Report) -> str:
    severities = sorted(
        {s for ev in report.evaluations for by in (ev.corruptions.per_corruption or {}).values() for s in by},
        key=int,
    )
    rows = []
    for ev in report.evaluations:
        # Segmentation evaluations list mIoU, which their mCE is computed on.
        c = ev.corruptions
        scores = c.per_corruption_map or c.per_corruption_miou or c.per_corruption or {}
        metric = " (mAP)" if c.per_corruption_map else " (mIoU)" if c.per_corruption_miou else ""
        for name, by_sev in scores.items():
            rows.append(
                [
                    f"{ev.model}/{ev.runtime}/{ev.precision}{metric}",
                    name,
                    *[pct(by_sev.get(s)) for s in severities],
                ]
            )
    if not rows:
        return ""
    return "<h2>Corruptions</h2>" + _table(
        ["evaluation", "corruption", *[f"severity {s}" for s in severities]], rows, numeric_from=2
    )


def _latency_table(report: Report) -> str:
    if not report.latency:
        return ""
    rows = [
        [
            r.model,
            r.runtime,
            r.precision,
            str(r.batch),
            f"{r.p50_ms:.3f}",
            f"{r.p90_ms or 0:.3f}",
            f"{r.p99_ms or 0:.3f}",
            f"{r.throughput or 0:.1f}",
        ]
        for r in report.latency
    ]
    header = ["model", "runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"]
    return "<h2>Latency</h2>" + _table(header, rows, "latency", numeric_from=3)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = _CAPTIONS.get(path.stem, path.stem)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(path.stem)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def render_html(report: Report, plots: list[Path]) -> str:
    """The whole page for ``report``, with the PNG files ``plots`` embedded.

    Args:
        report: the report.
        plots: PNG files to embed (read now; the page does not refer to them).
    """
    verdict = "PASSED" if report.passed else "FAILED"
    title = report.name or (report.engine.path if report.engine else "report")
    meta = [
        f"status: {report.status or 'unknown'}",
        f"dataset: {report.dataset}",
        *([f"architecture: {report.arch}"] if report.arch else []),
        *([f"criterion: {report.criterion}"] if report.criterion else []),
        *([f"engine: {report.engine.path}"] if report.engine else []),
        f"recipe sha256: {report.recipe_sha256[:12]}",
    ]
    env = ", ".join(f"{k} {v}" for k, v in report.environment.to_json().items() if v is not None)
    body = [
        f"<h1>robustprune: {escape(str(title))}</h1>",
        f'<p><span class="verdict {"pass" if report.passed else "fail"}">{verdict}</span></p>',
        f"<p class='meta'>{escape(' · '.join(meta))}</p>",
        "<h2>Summary</h2>",
        _summary(report),
        "<h2>Gates</h2>",
        _gates(report),
        "<h2>Evaluations</h2>",
        *[_evaluation(ev) for ev in report.evaluations],
        _corruption_table(report),
        _latency_table(report),
    ]
    if plots:
        body += ["<h2>Plots</h2>", *[_figure(p) for p in plots]]
    body.append(f"<p class='meta'>Environment: {escape(env)}</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>robustprune report: {escape(str(title))}</title><style>{_CSS}</style></head>"
        "<body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )
