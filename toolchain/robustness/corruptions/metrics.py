"""Corruption metrics from ImageNet-C (Hendrycks & Dietterich 2019): mCE and relative mCE.

Inputs are accuracies in [0, 1] per corruption and severity, ``{name: {severity: acc}}`` (the
severity keys may be ints or strings, as in ``report.json``), for the model under test and for
the dense baseline it is compared against, plus both clean accuracies. Errors are ``1 - acc``.

- ``CE_c = sum_s E_model(c, s) / sum_s E_dense(c, s)``; ``mCE`` is its mean over corruptions.
- ``relative CE_c = sum_s (E_model(c, s) - E_model_clean) / sum_s (E_dense(c, s) - E_dense_clean)``;
  ``relative mCE`` is its mean. It measures degradation *under corruption* relative to the
  baseline's, separately from clean accuracy.

Division by zero: a ratio whose denominator is <= 1e-12 is 1.0 when its numerator is also
<= 1e-12 (both models equally unaffected: no worse than the baseline) and ``math.inf`` otherwise
(the model degrades where the baseline does not; a ``<=`` gate on it then fails, i.e. fails
closed). A negative relative denominator (the baseline does better corrupted than clean, only
seen with tiny samples) is treated the same way. JSON writers should map ``inf`` to a string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from toolchain.errors import UserError

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
) -> dict[str, dict[str, float]]:
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
    result: dict[str, dict[str, float]] = {}
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
            "relative_ce": _ratio(rel_m, rel_d),
            "mean_accuracy": sum(m[name].values()) / len(sevs),
        }
    return result


def summarize(
    model: Accuracies, dense: Accuracies, model_clean: float, dense_clean: float
) -> dict[str, object]:
    """All corruption metrics as a plain dict (the shape ``report.json`` stores).

    Returns:
        ``{"mean_accuracy", "mce", "relative_mce", "per_corruption": {name: {...}}}`` with
        ``mce``/``relative_mce`` the means of the per-corruption ``ce``/``relative_ce``
        (``inf`` if any is ``inf``, see the module docstring).

    Raises:
        UserError: mismatched or out-of-range inputs.
    """
    per = corruption_errors(model, dense, model_clean, dense_clean)
    if not per:
        raise UserError("no corruption accuracies to summarise")
    return {
        "mean_accuracy": mean_corruption_accuracy(model),
        "mce": sum(p["ce"] for p in per.values()) / len(per),
        "relative_mce": sum(p["relative_ce"] for p in per.values()) / len(per),
        "per_corruption": per,
    }
