"""bench/aer.py's goal verdicts and its table beside a reference tool's results."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import aer  # noqa: E402

DENSE = {"clean": 0.80, "pgd20": 0.70, "corruptions_mean": 0.65}


def _row(budget: float, clean: float, pgd20: float, mce: float) -> dict[str, object]:
    return {"method": "m", "budget": budget, "seeds": 3, "clean": clean, "pgd20": pgd20,
            "corruptions_mean": 0.6, "relative_mce": mce, "macs_reduction": budget}  # fmt: skip


def test_goal_verdicts_follow_each_budgets_thresholds() -> None:
    assert aer.goal_misses(_row(4.0, 0.79, 0.68, 1.10), DENSE) == []  # exactly on every threshold
    assert aer.goal_misses(_row(4.0, 0.789, 0.679, 1.11), DENSE) == [
        "clean -1.1",
        "PGD-20 -2.1",
        "rel. mCE 1.11",
    ]
    # 8x: looser accuracy goals and no relative-mCE goal; 2x has no goal at all.
    assert aer.goal_misses(_row(8.0, 0.78, 0.67, 3.0), DENSE) == []
    assert aer.goal_misses(_row(8.0, 0.77, 0.67, 1.0), DENSE) == ["clean -3.0"]
    assert aer.goal_misses(_row(2.0, 0.1, 0.1, 9.0), DENSE) is None
    table = aer.render_goals({"dense_summary": DENSE, "summary": {"a": _row(4.0, 0.789, 0.69, 1.0)}})
    assert "| m | 4× | 3 | 78.9 | -1.1 | 69.0 | -1.0 |" in table and "missed: clean -1.1" in table


def test_runs_are_set_beside_the_reference_result_nearest_in_macs() -> None:
    reference = {
        "dense": {"clean": 0.82, "pgd20": 0.70},
        "magnitude_x4": {"macs_reduction": 4.26, "clean": 0.79, "pgd20": 0.67},
        "magnitude_x8": {"macs_reduction": 8.07, "clean": 0.76, "pgd20": 0.65},
    }
    payload = {
        "dense_summary": dict(DENSE),
        "summary": {"a": _row(3.95, 0.80, 0.66, 1.0), "b": {**_row(7.9, 0.75, 0.66, 1.0), "seeds": 1}},
        "reference": {"source": "anchor.json", "results": reference},
    }
    payload["summary"]["a"].update(clean_std=0.004, pgd20_std=0.012)
    lines = aer.render_reference(payload).splitlines()
    assert lines[2].startswith("| dense | 1.00× | 80.0 | 70.0 | 1.00×, 82.0 / 70.0 | neither |")
    # Several seeds: the mean judged, shown with its standard deviation.
    assert lines[3] == "| m (3 seeds) | 3.95× | 80.0 ± 0.4 | 66.0 ± 1.2 | 4.26×, 79.0 / 67.0 | clean only |"
    assert lines[4].endswith("| 8.07×, 76.0 / 65.0 | PGD-20 only |")
    # Scored as the script scores (its test images, its attack beside the project's), the
    # comparison uses those figures: clean, and PGD-20 under the script's attack.
    for row, scores in zip(
        (payload["dense_summary"], *payload["summary"].values()),
        ((0.83, 0.69, 0.71), (0.78, 0.66, 0.68), (0.77, 0.64, 0.64)),
    ):
        row.update(zip(("anchor_clean", "anchor_pgd20", "anchor_pgd20_unprojected"), scores))
        row.update(anchor_clean_std=0.0, anchor_pgd20_std=0.01, anchor_pgd20_unprojected_std=0.02)
    lines = aer.render_reference(payload).splitlines()
    assert "the script's attack" in lines[0]
    assert lines[2].startswith("| dense | 1.00× | 83.0 | 69.0 | 71.0 | 1.00×, 82.0 / 70.0 | both |")
    assert lines[3].endswith("| 78.0 ± 0.0 | 66.0 ± 1.0 | 68.0 ± 2.0 | 4.26×, 79.0 / 67.0 | PGD-20 only |")
    assert lines[4].endswith("| 77.0 | 64.0 | 64.0 | 8.07×, 76.0 / 65.0 | clean only |")


def test_verdict_prose_names_each_budgets_deltas_and_verdict() -> None:
    payload = {
        "dense_summary": DENSE,
        "summary": {"a": _row(8.0, 0.77, 0.69, 1.2), "b": _row(4.0, 0.795, 0.69, 1.05)},
    }
    assert aer.render_verdicts(payload) == (
        "at 4× (3 seeds) -0.5 clean / -1.0 PGD-20 points, relative mCE 1.05: goal met; "
        "at 8× (3 seeds) -3.0 clean / -1.0 PGD-20 points, relative mCE 1.20: goal missed"
    )
