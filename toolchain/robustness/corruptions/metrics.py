"""Corruption metrics from ImageNet-C (Hendrycks & Dietterich 2019): mCE and relative mCE.

Inputs are accuracies in [0, 1] per corruption and severity, ``{name: {severity: acc}}`` (the
severity keys may be ints or strings, as in ``report.json``), for the model under test and for
the dense baseline it is compared against, plus both clean accuracies. Errors are ``1 - acc``.

- ``CE_c = sum_s E_model(c, s) / sum_s E_dense(c, s)``; ``mCE`` is its mean over corruptions.
- ``relative CE_c = D_model(c) / max(D_dense(c), floor)`` with the degradation
  ``D(c) = max(0, sum_s (E(c, s) - E_clean))`` and ``floor = 0.01 x severities`` (one point of
  accuracy per severity); ``relative mCE`` is its mean. It measures degradation *under
  corruption* relative to the baseline's, separately from clean accuracy.

The relative rule, for every corruption:

* both degradations below the floor: neither model degrades, there is nothing to compare; the
  relative CE is undefined (None) and the corruption is listed in ``relative_excluded`` (it
  still counts in mCE);
* the baseline's below the floor, the compared model's not: the compared model degrades where
  the baseline does not. It counts, divided by the floor (so a 30-point loss on 2 severities is
  0.6 / 0.02 = 30), and is listed in ``relative_floored``; never dropped;
* otherwise the ratio. A model doing better corrupted than clean (sampling noise, an INT8
  file) has degradation 0, never a negative one.

So every relative CE lies in [0, 100] (a degradation is at most 1 per severity): no negative
or exploding values from a near-zero denominator. A CE whose denominator is <= 1e-12 (the
baseline makes no error) is 1.0 when its numerator is also <= 1e-12 and ``math.inf``
otherwise (a ``<=`` gate on it then fails, i.e. fails closed); JSON writers should map ``inf``
to null or a string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from toolchain.errors import UserError
from toolchain.report.schema import Evaluation
from toolchain.tasks import task_named

Accuracies = Mapping[str, Mapping[int | str, float]]
_EPS = 1e-12
#: The least degradation (error above clean error) per severity that counts as one: one point.
RELATIVE_FLOOR = 0.01


def _ratio(num: float, den: float) -> float:
    if den > _EPS:
        return num / den
    return 1.0 if num <= _EPS else math.inf


def _normalised(acc: Accuracies, who: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, per_sev in acc.items():
        if not per_sev:
            raise UserError(f"{who} accuracies for corruption {name!r} are empty")
        out[name] = {}
        for sev, value in per_sev.items():
            value = float(value)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise UserError(f"{who} accuracy {name}/{sev} = {value} is not in [0, 1]")
            out[name][str(sev)] = value
    return out


def _check_clean(value: float, who: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{who} clean accuracy {value} is not in [0, 1]")
    return value


def mean_corruption_accuracy(acc: Accuracies) -> float:
    """Mean accuracy over every (corruption, severity) pair.

    Raises:
        UserError: no accuracies, or a value outside [0, 1].
    """
    values = [v for per in _normalised(acc, "model").values() for v in per.values()]
    if not values:
        raise UserError("no corruption accuracies to average")
    return sum(values) / len(values)


def corruption_errors(
    model: Accuracies, dense: Accuracies, model_clean: float, dense_clean: float
) -> dict[str, dict[str, float | None]]:
    """Per corruption: ``{"ce", "relative_ce", "floored", "mean_accuracy"}`` for the model vs the
    dense baseline (``floored``: the relative CE is over the floor, see the module docstring).

    Raises:
        UserError: the two sets of accuracies do not cover the same corruptions and severities,
            or a value is outside [0, 1].
    """
    m, d = _normalised(model, "model"), _normalised(dense, "dense")
    mc, dc = _check_clean(model_clean, "model"), _check_clean(dense_clean, "dense")
    if m.keys() != d.keys():
        raise UserError(
            f"model and dense accuracies cover different corruptions: {sorted(m.keys() ^ d.keys())}"
        )
    result: dict[str, dict[str, float | None]] = {}
    for name in sorted(m):
        if m[name].keys() != d[name].keys():
            raise UserError(f"model and dense accuracies for {name!r} cover different severities")
        sevs = sorted(m[name])
        err_m = sum(1 - m[name][s] for s in sevs)
        err_d = sum(1 - d[name][s] for s in sevs)
        rel_m = sum((1 - m[name][s]) - (1 - mc) for s in sevs)
        rel_d = sum((1 - d[name][s]) - (1 - dc) for s in sevs)
        relative, floored = _relative(rel_m, rel_d, RELATIVE_FLOOR * len(sevs))
        result[name] = {
            "ce": _ratio(err_m, err_d),
            "relative_ce": relative,
            "floored": floored,
            "mean_accuracy": sum(m[name].values()) / len(sevs),
        }
    return result


def _relative(model_drop: float, dense_drop: float, floor: float) -> tuple[float | None, bool]:
    """The relative CE of one corruption (see the module docstring), and whether the dense
    model's degradation was floored: None when neither model degrades by the floor, else the
    model's degradation over the dense one's, floored."""
    model_drop, dense_drop = max(model_drop, 0.0), max(dense_drop, 0.0)
    if model_drop < floor and dense_drop < floor:
        return None, False
    return model_drop / max(dense_drop, floor), dense_drop < floor


def summarize(
    model: Accuracies, dense: Accuracies, model_clean: float, dense_clean: float
) -> dict[str, object]:
    """All corruption metrics as a plain dict (the shape ``report.json`` stores).

    Returns:
        ``{"mean_accuracy", "mce", "relative_mce", "relative_excluded", "relative_floored",
        "per_corruption": {name: {...}}}`` with ``mce`` the mean of the per-corruption ``ce``
        (``inf`` if any is) and ``relative_mce`` the mean of the defined ``relative_ce`` (None
        if none is), see the module docstring.

    Raises:
        UserError: mismatched or out-of-range inputs.
    """
    per = corruption_errors(model, dense, model_clean, dense_clean)
    if not per:
        raise UserError("no corruption accuracies to summarise")
    relative = [p["relative_ce"] for p in per.values() if p["relative_ce"] is not None]
    return {
        "mean_accuracy": mean_corruption_accuracy(model),
        "mce": sum(float(p["ce"] or 0.0) for p in per.values()) / len(per),
        "relative_mce": sum(relative) / len(relative) if relative else None,
        "relative_excluded": sorted(name for name, p in per.items() if p["relative_ce"] is None),
        "relative_floored": sorted(name for name, p in per.items() if p["floored"]),
        "per_corruption": per,
    }


def add_corruption_errors(evaluations: Sequence[Evaluation]) -> None:
    """Fill each evaluation's corruption errors relative to the dense model on the same runtime.

    The errors are computed on the score the evaluation's task names (accuracy for
    classification, mIoU for segmentation; :meth:`toolchain.tasks.Task.corruption_scores`).
    """
    dense = {(e.runtime, e.precision): e for e in evaluations if e.model == "dense"}
    for ev in evaluations:
        task = task_named(ev.task)
        per, clean = task.corruption_scores(ev)
        if not per:
            continue
        base = dense.get((ev.runtime, ev.precision)) or dense.get(("torch", "fp32"))
        base_per, base_clean = task.corruption_scores(base) if base is not None else (None, 0.0)
        if base is None or not base_per:
            continue
        summary = summarize(per, base_per, clean, base_clean)  # type: ignore[arg-type]  # str severities
        ev.corruptions.mce = _finite(summary["mce"])
        ev.corruptions.relative_mce = _finite(summary["relative_mce"])
        ev.corruptions.relative_excluded = sorted(summary["relative_excluded"])  # type: ignore[call-overload]
        ev.corruptions.relative_floored = sorted(summary["relative_floored"])  # type: ignore[call-overload]
        ev.corruptions.baseline = {"model": base.model, "runtime": base.runtime, "precision": base.precision}
        ev.corruptions.errors = {
            name: {k: _finite(v) for k, v in row.items() if k in ("ce", "relative_ce")}
            for name, row in summary["per_corruption"].items()  # type: ignore[attr-defined]
        }


def _finite(value: Any) -> float | None:
    """report.json is strict JSON: an infinite or undefined ratio is written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
