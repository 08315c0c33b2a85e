"""Plots people look at instead of reading: accuracies per evaluation, corruption curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """Write PNG plots for ``report`` into ``folder``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    evaluations = report.get("evaluations", [])
    if evaluations:
        path = folder / "accuracy.png"
        _accuracy_bars(plt, evaluations, path)
        written.append(path)
    if any(ev.get("corruptions", {}).get("per_corruption") for ev in evaluations):
        path = folder / "corruptions.png"
        _corruption_curves(plt, evaluations, path)
        written.append(path)
    return written


def _accuracy_bars(plt: Any, evaluations: list[dict[str, Any]], path: Path) -> None:
    metrics = ["clean"]
    for ev in evaluations:
        for a in ev.get("attacks", []):
            label = f"{a['name']} ({a['mode']})"
            if label not in metrics:
                metrics.append(label)
    if any("mean_accuracy" in ev.get("corruptions", {}) for ev in evaluations):
        metrics.append("corruptions (mean)")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * len(evaluations) / 2), 4))
    width = 0.8 / len(evaluations)
    for i, ev in enumerate(evaluations):
        values = {
            "clean": ev["clean_accuracy"],
            "corruptions (mean)": ev.get("corruptions", {}).get("mean_accuracy"),
        }
        for a in ev.get("attacks", []):
            values[f"{a['name']} ({a['mode']})"] = a["accuracy"]
        xs = [j + i * width for j in range(len(metrics))]
        ys = [values.get(m) or 0.0 for m in metrics]
        ax.bar(xs, ys, width, label=f"{ev['model']} / {ev['runtime']} / {ev['precision']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per evaluation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _corruption_curves(plt: Any, evaluations: list[dict[str, Any]], path: Path) -> None:
    names = sorted({n for ev in evaluations for n in ev.get("corruptions", {}).get("per_corruption", {})})
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for ev in evaluations:
            by_sev = ev.get("corruptions", {}).get("per_corruption", {}).get(name)
            if not by_sev:
                continue
            sev = [0] + [int(s) for s in by_sev]
            acc = [ev["clean_accuracy"], *list(by_sev.values())]
            style = "-" if ev["model"] == "pruned" else "--"
            ax.plot(sev, acc, style, marker="o", ms=3, label=f"{ev['model']}/{ev['runtime']}")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("severity (0 = clean)", fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
