"""Gates: pass/fail rules on report metrics, fail-closed.

A metric is a dotted path into report.json. Lists are indexed with selectors that must match
exactly one element, e.g.::

    models.pruned.macs_reduction
    evaluations[model=pruned,runtime=onnxruntime].clean_accuracy
    evaluations[model=pruned,runtime=onnxruntime].attacks[name=pgd,mode=transfer].accuracy
    evaluations[model=pruned,runtime=onnxruntime].corruptions.per_corruption.fog.5
    latency[model=pruned,batch=1].p50_ms

A path that resolves to nothing (or to several things, or to a non-number) fails its gate.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}
_TOKEN = re.compile(r"([^.\[\]]+)(?:\[([^\]]*)\])?")


class MetricNotFound(LookupError):
    """The metric path does not lead to exactly one number."""


def _split(path: str) -> list[tuple[str, str | None]]:
    parts: list[tuple[str, str | None]] = []
    pos = 0
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if not match:
            raise MetricNotFound(f"cannot parse metric path {path!r} at {path[pos:]!r}")
        parts.append((match.group(1), match.group(2)))
        pos = match.end()
        if pos < len(path):
            if path[pos] != ".":
                raise MetricNotFound(f"cannot parse metric path {path!r} at {path[pos:]!r}")
            pos += 1
    return parts


def _select(items: list[Any], selector: str, where: str) -> Any:
    wanted = {}
    for clause in filter(None, (c.strip() for c in selector.split(","))):
        key, sep, value = clause.partition("=")
        if not sep:
            raise MetricNotFound(f"{where}: selector {clause!r} must be key=value")
        wanted[key.strip()] = value.strip()
    matches = [
        item
        for item in items
        if isinstance(item, dict) and all(str(item.get(k)) == v for k, v in wanted.items())
    ]
    if len(matches) != 1:
        raise MetricNotFound(f"{where}[{selector}] matches {len(matches)} entries, not exactly one")
    return matches[0]


def resolve_metric(report: dict[str, Any], path: str) -> float:
    """The number at ``path`` in ``report``.

    Raises:
        MetricNotFound: the path is malformed, missing, ambiguous, or not a number.
    """
    node: Any = report
    where = ""
    for key, selector in _split(path):
        where = f"{where}.{key}" if where else key
        if not isinstance(node, dict) or key not in node:
            raise MetricNotFound(f"{where} is not in the report")
        node = node[key]
        if selector is not None:
            if not isinstance(node, list):
                raise MetricNotFound(f"{where} is not a list; drop the [..] selector")
            node = _select(node, selector, where)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise MetricNotFound(f"{path} is {type(node).__name__}, not a number")
    return float(node)


def _value(report: dict[str, Any], gate: dict[str, Any], baseline: dict[str, Any] | None) -> float:
    value = resolve_metric(report, gate["metric"])
    relative = gate.get("relative")
    if relative is None:
        return value
    if baseline is None:
        raise MetricNotFound(f"{gate['metric']}: a relative gate needs a baseline report (--baseline)")
    base = resolve_metric(baseline, gate["metric"])
    if relative == "delta":
        return value - base
    if base == 0:
        raise MetricNotFound(f"{gate['metric']}: baseline value is 0, a ratio is undefined")
    return value / base


def evaluate_gates(
    report: dict[str, Any], gates: Iterable[Any], baseline: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Check each gate (objects or dicts with metric, op, threshold[, relative]) against ``report``.

    A relative gate compares ``value - baseline`` (``delta``) or ``value / baseline``
    (``ratio``) with the threshold, for regression gates between releases.

    Returns:
        One dict per gate: ``metric, op, threshold, relative, value, passed`` and, when the
        metric is missing (here or in the baseline), ``error`` (``value`` None, ``passed`` False).
    """
    results = []
    for gate in gates:
        g = gate if isinstance(gate, dict) else gate.model_dump()
        row: dict[str, Any] = {
            "metric": g["metric"],
            "op": g.get("op", ">="),
            "threshold": float(g["threshold"]),
            "relative": g.get("relative"),
        }
        try:
            value = _value(report, g, baseline)
        except MetricNotFound as exc:
            row.update(value=None, passed=False, error=str(exc))
        else:
            row.update(value=value, passed=bool(_OPS[row["op"]](value, row["threshold"])))
        results.append(row)
    return results
