"""Corruption metrics from ImageNet-C (Hendrycks & Dietterich 2019): mCE and relative mCE.

Inputs are accuracies in [0, 1] per corruption and severity, ``{name: {severity: acc}}`` (the
severity keys may be ints or strings, as in ``report.json``), for the model under test and for
the dense baseline it is compared against, plus both clean accuracies. Errors are ``1 - acc``.

- ``CE_c = sum_s E_model(c, s) / sum_s E_dense(c, s)``; ``mCE`` is its mean over corruptions.
- ``relative CE_c = sum_s (E_model(c, s) - E_model_clean) / sum_s (E_dense(c, s) - E_dense_clean)``;
  ``relative mCE`` is its mean. It measures degradation *under corruption* relative to the
  baseline's, separately from clean accuracy.

Division by zero: a CE whose denominator is <= 1e-12 (the baseline makes no error) is 1.0
when its numerator is also <= 1e-12 and ``math.inf`` otherwise (a ``<=`` gate on it then
fails, i.e. fails closed). A relative CE is *undefined* (None) for a corruption that does not
degrade the baseline (its corrupted error is not above its clean error: mild brightness, or
low light on a dataset of dark images): there is no degradation to compare with, and one such
corruption would otherwise make the whole relative mCE infinite. Relative mCE is the mean over
the corruptions where it is defined; the others are listed in ``relative_excluded`` (and
still count in mCE). JSON writers should map ``inf`` to null or a string.
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
    """Per corruption: ``{"ce", "relative_ce", "mean_accuracy"}`` for the model vs the dense baseline.

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
        result[name] = {
            "ce": _ratio(err_m, err_d),
            "relative_ce": rel_m / rel_d if rel_d > _EPS else None,
            "mean_accuracy": sum(m[name].values()) / len(sevs),
        }
    return result


def summarize(
    model: Accuracies, dense: Accuracies, model_clean: float, dense_clean: float
) -> dict[str, object]:
    """All corruption metrics as a plain dict (the shape ``report.json`` stores).

    Returns:
        ``{"mean_accuracy", "mce", "relative_mce", "relative_excluded", "per_corruption":
        {name: {...}}}`` with ``mce`` the mean of the per-corruption ``ce`` (``inf`` if any is)
        and ``relative_mce`` the mean of the defined ``relative_ce`` (None if none is), see the
        module docstring.

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
