"""Plots people look at instead of reading, as PNG files (report.md links them, report.html
embeds them).

* ``accuracy.png``: clean, attack and corruption accuracy per evaluation;
* ``corruptions.png``: accuracy against severity per corruption, dense vs pruned vs engine;

(segmentation reports draw mIoU wherever these say accuracy)
* ``robust_eps.png``: robust accuracy (per-image worst case) against eps;
* ``tradeoff.png``: accuracy against MACs and against latency, dense vs pruned;
* ``channels.png``: output channels per layer before and after pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.report.schema import Evaluation, Report

DPI = 110


def write_plots(report: Report, folder: Path) -> list[Path]:
    """Write the plots that apply to ``report`` into ``folder``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    evaluations = report.evaluations
    plots = {
        "accuracy": _accuracy_bars if evaluations else None,
        "corruptions": _corruption_curves if any(e.corruptions.per_corruption for e in evaluations) else None,
        "robust_eps": _robust_vs_eps if any(e.robust_accuracy for e in evaluations) else None,
        "tradeoff": _tradeoff if report.models.dense and report.models.pruned and evaluations else None,
        "channels": _channels if report.models.dense and report.models.dense.channels else None,
    }
    written = []
    for name, draw in plots.items():
        if draw is None:
            continue
        path = folder / f"{name}.png"
        fig = draw(plt, report)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


def _label(ev: Evaluation) -> str:
    return f"{ev.model} / {ev.runtime} / {ev.precision}"


def _score(accuracy: float | None, miou: float | None, map_: float | None = None) -> float | None:
    """What the plots draw: mAP where one was measured (detection), mIoU (segmentation), else
    accuracy."""
    if map_ is not None:
        return map_
    return miou if miou is not None else accuracy


def _corruption_scores(ev: Evaluation) -> dict[str, dict[str, float]]:
    c = ev.corruptions
    return c.per_corruption_map or c.per_corruption_miou or c.per_corruption or {}


def _metric_name(report: Report) -> str:
    if any(ev.map is not None for ev in report.evaluations):
        return "mAP"
    return "mIoU" if any(ev.miou is not None for ev in report.evaluations) else "accuracy"


def _accuracy_bars(plt: Any, report: Report) -> Any:
    evaluations = report.evaluations
    metrics = ["clean"]
    for ev in evaluations:
        for a in ev.attacks:
            label = f"{a.name} ({a.mode})"
            if label not in metrics:
                metrics.append(label)
    if any(ev.corruptions.mean_accuracy is not None for ev in evaluations):
        metrics.append("corruptions (mean)")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * len(evaluations) / 2), 4))
    width = 0.8 / len(evaluations)
    for i, ev in enumerate(evaluations):
        values = {
            "clean": _score(ev.clean_accuracy, ev.miou, ev.map),
            "corruptions (mean)": _score(
                ev.corruptions.mean_accuracy, ev.corruptions.mean_miou, ev.corruptions.mpc
            ),
        }
        for a in ev.attacks:
            values[f"{a.name} ({a.mode})"] = _score(a.accuracy, a.miou, a.map)
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [values.get(m) or 0.0 for m in metrics], width, label=_label(ev))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(_metric_name(report))
    ax.set_title(f"{_metric_name(report)} per evaluation".capitalize())
    ax.legend(fontsize=7)
    return fig


def _corruption_curves(plt: Any, report: Report) -> Any:
    evaluations = report.evaluations
    names = sorted({n for ev in evaluations for n in _corruption_scores(ev)})
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for ev in evaluations:
            by_sev = _corruption_scores(ev).get(name)
            if not by_sev:
                continue
            sev = [0] + [int(s) for s in by_sev]
            acc = [_score(ev.clean_accuracy, ev.miou, ev.map), *by_sev.values()]
            style = "-" if ev.model == "pruned" else "--"
            ax.plot(sev, acc, style, marker="o", ms=3, label=f"{ev.model}/{ev.runtime}")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("severity (0 = clean)", fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{_metric_name(report)} against corruption severity", fontsize=10)
    return fig


def _robust_vs_eps(plt: Any, report: Report) -> Any:
    norms = sorted({r.norm for ev in report.evaluations for r in ev.robust_accuracy})
    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.6), squeeze=False)
    for ax, norm in zip(axes.flat, norms):
        scale = 255 if norm == "linf" else 1
        for ev in report.evaluations:
            points = sorted((r.eps, r.accuracy) for r in ev.robust_accuracy if r.norm == norm)
            if not points:
                continue
            xs = [0.0] + [e * scale for e, _ in points]
            ys = [ev.clean_accuracy] + [a for _, a in points]
            style = "-" if ev.model == "pruned" else "--"
            ax.plot(xs, ys, style, marker="o", ms=4, label=_label(ev))
        ax.set_xlabel("eps (x/255)" if norm == "linf" else "eps (L2)")
        ax.set_ylabel("robust accuracy (worst case over attacks)")
        ax.set_ylim(0, 1)
        ax.set_title(f"Robust accuracy against eps ({norm})", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def _engine_evaluations(report: Report) -> dict[str, Evaluation]:
    """Per model, the evaluation on the deployed runtime (the first non-PyTorch one, else PyTorch)."""
    chosen: dict[str, Evaluation] = {}
    for ev in sorted(report.evaluations, key=lambda e: e.runtime == "torch"):
        chosen.setdefault(ev.model, ev)
    return chosen


def _tradeoff(plt: Any, report: Report) -> Any:
    dense, pruned = report.models.dense, report.models.pruned
    assert dense is not None and pruned is not None  # checked by write_plots
    chosen = _engine_evaluations(report)
    macs = {"dense": dense.macs / 1e6, "pruned": pruned.macs / 1e6}
    latency: dict[tuple[str, str], float] = {}
    for row in sorted(report.latency, key=lambda r: r.batch):
        latency.setdefault((row.model, row.runtime), row.p50_ms)
    axes_x = [("MACs (M)", macs)]
    runtime = next(iter(chosen.values())).runtime
    lat = {m: latency[(m, runtime)] for m in ("dense", "pruned") if (m, runtime) in latency}
    if len(lat) == 2:
        axes_x.append((f"p50 latency, {runtime}, smallest batch (ms)", lat))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 3.8), squeeze=False)
    for ax, (xlabel, xs) in zip(axes.flat, axes_x):
        for metric, value in _tradeoff_metrics(chosen).items():
            pts = [(xs[m], value(chosen[m])) for m in ("dense", "pruned") if m in chosen and m in xs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=metric)
                for (x, y), m in zip(pts, ("dense", "pruned")):
                    ax.annotate(m, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_name(report))
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"{_metric_name(report)} against cost ({runtime})", fontsize=10)
    return fig


def _tradeoff_metrics(chosen: dict[str, Evaluation]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"clean": lambda e: _score(e.clean_accuracy, e.miou, e.map)}
    if any(e.corruptions.mean_accuracy is not None for e in chosen.values()):
        metrics["corruptions (mean)"] = lambda e: _score(e.corruptions.mean_accuracy, e.corruptions.mean_miou)
    budgets = sorted({(r.norm, r.eps) for e in chosen.values() for r in e.robust_accuracy})
    for norm, eps in budgets:
        label = f"robust {norm} eps={eps * 255:.3g}/255" if norm == "linf" else f"robust {norm} eps={eps:.3g}"
        metrics[label] = lambda e, k=(norm, eps): next(
            (r.accuracy for r in e.robust_accuracy if (r.norm, r.eps) == k), None
        )
    return metrics


def _channels(plt: Any, report: Report) -> Any:
    dense = report.models.dense.channels if report.models.dense else None
    pruned = report.models.pruned.channels if report.models.pruned else None
    layers = list(dense or {})
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [(dense or {})[k] for k in layers], 0.4, label="dense")
    if pruned:
        ax.bar([x + 0.2 for x in xs], [pruned.get(k, 0) for k in layers], 0.4, label="pruned")
    ax.set_xticks(list(xs), layers, rotation=70, ha="right", fontsize=6)
    ax.set_ylabel("output channels")
    ax.set_title("Channels per layer before and after pruning")
    ax.legend(fontsize=7)
    return fig
