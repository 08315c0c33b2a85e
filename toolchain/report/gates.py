"""Gates: pass/fail rules on report metrics, fail-closed.

A metric is a dotted path into report.json. Lists are indexed with selectors that must match
exactly one element, e.g.::

    models.pruned.macs_reduction
    evaluations[model=pruned,runtime=onnxruntime].clean_accuracy
    evaluations[model=pruned,runtime=onnxruntime].attacks[name=pgd,mode=transfer].accuracy
    evaluations[model=pruned,runtime=onnxruntime].corruptions.per_corruption.fog.5
    latency[model=pruned,batch=1].p50_ms
    evaluations[model=pruned,runtime=onnxruntime].robust_accuracy[norm=linf,attacks=square].accuracy

A path that resolves to nothing (or to several things, or to a non-number) fails its gate. A
list-valued key is selected with ``+`` between its items, in any order (``attacks=pgd+square``).
A per-budget worst case that lacks some of the recipe's attacks (``missing``: a bare engine has
no white-box attacks) fails its gate unless the selector names the attacks it does cover.

Besides the recipe's (or a policy's) gates, every report is held to the intrinsic gates
(:func:`verdict_gates`), whatever the recipe says; one of them fails a report with no gate or
no evaluation of an exported file, which would otherwise pass having checked nothing.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from toolchain.errors import RecipeError
from toolchain.recipe import Gate
from toolchain.recipe_prune import reduction_met
from toolchain.report.schema import GateResult, IntrinsicGate, Report

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
        if isinstance(item, dict) and all(_matches(item.get(k), v) for k, v in wanted.items())
    ]
    if len(matches) != 1:
        raise MetricNotFound(f"{where}[{selector}] matches {len(matches)} entries, not exactly one")
    match = matches[0]
    missing = match.get("missing")
    if missing and "attacks" not in wanted:
        # A worst case over fewer attacks than the recipe's is not the recipe's worst case.
        covered = match.get("attacks") or []
        raise MetricNotFound(
            f"{where}[{selector}] is the worst case over {', '.join(covered) or 'no attack'} only: the "
            f"recipe's {', '.join(missing)} did not run (see skipped); to gate on that subset, name it: "
            f"{where}[{selector},attacks={'+'.join(covered)}]"
        )
    return match


def _matches(value: Any, wanted: str) -> bool:
    """A selector clause: ``key=value``, or for a list ``key=a+b`` (the same names, any order)."""
    if isinstance(value, list):
        return sorted(map(str, value)) == sorted(w.strip() for w in wanted.split("+"))
    return str(value) == wanted


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
    report: dict[str, Any] | Report, gates: Iterable[Any], baseline: dict[str, Any] | Report | None = None
) -> list[GateResult]:
    """Check each gate (objects or dicts with metric, op, threshold[, relative]) against ``report``.

    A relative gate compares ``value - baseline`` (``delta``) or ``value / baseline``
    (``ratio``) with the threshold, for regression gates between releases. Metric paths are
    resolved in the report's JSON form.

    Returns:
        One result per gate; when the metric is missing (here or in the baseline) its
        ``value`` is None, ``passed`` False and ``error`` says why.
    """
    data = report.to_json() if isinstance(report, Report) else report
    base = baseline.to_json() if isinstance(baseline, Report) else baseline
    results = []
    for gate in gates:
        g = _checked(gate)
        row: dict[str, Any] = g.model_dump()
        try:
            value = _value(data, row, base)
        except MetricNotFound as exc:
            row.update(value=None, passed=False, error=str(exc))
        else:
            # A NaN compares false with everything: it fails every op.
            row.update(value=value, passed=bool(_OPS[g.op](value, g.threshold)))
        results.append(GateResult(**row))
    return results


def _checked(gate: Any) -> Gate:
    """``gate`` (a Gate, or a dict such as a report's ``gates[]`` row) as a validated Gate.

    Raises:
        RecipeError: a key is missing or wrong, e.g. an ``op`` that is not a comparison (a
            report's gates are re-read by ``robustprune gate``, and may have been edited).
    """
    if isinstance(gate, Gate):
        return gate
    fields = (
        {k: v for k, v in dict(gate).items() if k in Gate.model_fields} if isinstance(gate, dict) else gate
    )
    try:
        return Gate.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "gate"
        metric = fields.get("metric") if isinstance(fields, dict) else None
        said = f"{where} {err['input']!r}" if where in ("op", "relative", "threshold") else where
        raise RecipeError(
            f"gate on {metric!r}: {said}: {err['msg']}; fix that gate (in the recipe's gates, the --policy "
            "file, or the report's gates[])"
        ) from None


def intrinsic_gates(report: Report) -> list[IntrinsicGate]:
    """The gates every run must pass, whatever its recipe says; each fails closed.

    * ``budget-met``: the pruned model met its target reduction within the tolerance
      (``models.pruned.target_met``); applies when the report has a pruned model.
    * ``engine-parity``: every FP32 engine agrees with PyTorch on every image (top-1 agreement
      1.0 in each evaluation's ``parity`` and in the export-time ``parity``, no NaN/Inf there),
      every FP16 engine on at least :data:`FP16_MIN_AGREEMENT` of them, and the exported file's
      logits are within ``export.parity_atol`` of PyTorch's (``parity.*.within_atol``);
      applies when an engine was compared with its PyTorch model.
    * ``finite-logits``: no runtime returned a NaN or Inf logit on any image
      (``nonfinite_logits`` 0 in every evaluation; a missing count fails).
    """
    gates = []
    pruned = report.models.pruned
    if pruned is not None:
        gates.append(
            _budget_gate(
                pruned.target_met,
                pruned.target,
                pruned.macs_reduction,
                pruned.params_reduction,
                pruned.latency,
                pruned.tolerance,
            )
        )
    parity = _parity_gate(report)
    if parity is not None:
        gates.append(parity)
    bad = [
        f"{e.model}/{e.runtime}/{e.precision}: {e.nonfinite_logits}"
        for e in report.evaluations
        if e.nonfinite_logits
    ]
    unknown = [
        f"{e.model}/{e.runtime}/{e.precision}" for e in report.evaluations if e.nonfinite_logits is None
    ]
    if bad:
        detail = "images with NaN/Inf logits: " + ", ".join(bad)
    elif unknown:
        detail = "no NaN/Inf count recorded for " + ", ".join(unknown)
    else:
        detail = f"every logit finite in {len(report.evaluations)} evaluations"
    gates.append(IntrinsicGate(name="finite-logits", passed=not bad and not unknown, detail=detail))
    return gates


def _budget_gate(
    met: bool | None,
    target: dict[str, float] | None,
    macs_reduction: float,
    params_reduction: float,
    latency: dict[str, Any] | None = None,
    tolerance: float | None = None,
) -> IntrinsicGate:
    if met is None or not target:
        return IntrinsicGate(
            name="budget-met", passed=False, detail="no pruning target recorded in models.pruned"
        )
    achieved = {"macs_reduction": macs_reduction, "params_reduction": params_reduction}
    if latency is not None:
        achieved["latency_reduction"] = latency["measured_reduction"]
    nan = float("nan")
    # Recorded and re-checked from the numbers (a NaN never meets a target).
    met = bool(met) and all(
        reduction_met(achieved.get(k, nan), v, tolerance or 0.0) for k, v in target.items()
    )
    said = ", ".join(f"{k} {achieved.get(k, nan):.3f} (target {v:g})" for k, v in target.items())
    return IntrinsicGate(name="budget-met", passed=met, detail=("met: " if met else "missed: ") + said)


#: The top-1 agreement with PyTorch an FP16 engine must keep. Half precision moves a logit by
#: about 1e-3 of its scale, which flips near-tied images only: more than 1% flipped is a bad
#: engine, not rounding. (INT8 files are held to their FP32 file by ``quantize.gate``.)
FP16_MIN_AGREEMENT = 0.99


def _parity_gate(report: Report) -> IntrinsicGate | None:
    checked, problems = 0, []
    for ev in report.evaluations:
        if ev.runtime == "torch" or ev.precision not in ("fp32", "fp16") or ev.parity is None:
            continue
        checked += 1
        p = ev.parity
        need = 1.0 if ev.precision == "fp32" else FP16_MIN_AGREEMENT
        if not _agrees(p.top1_agreement, p.max_abs_diff, need) or p.nonfinite:
            agreement = f"top-1 agreement {p.top1_agreement:.4f} (needs {need:g})"
            where = f"{ev.model}/{ev.runtime}" + ("/fp16" if ev.precision == "fp16" else "")
            diff = f"max |dlogit| {p.max_abs_diff}"
            problems.append(f"{where}: {agreement}, {diff}, {p.nonfinite} NaN/Inf images")
    for name, export in (report.parity or {}).items():
        checked += 1
        if not _agrees(export.top1_agreement, export.max_abs_diff):
            agreement = f"top-1 agreement {export.top1_agreement:.4f}"
            problems.append(f"export {name}: {agreement}, max |dlogit| {export.max_abs_diff}")
        elif not export.within_atol:
            problems.append(
                f"export {name}: max |dlogit| {export.max_abs_diff:.2e} is beyond export.parity_atol (raise "
                "it only if report.parity's float64 check shows PyTorch's own float32 error is as large)"
            )
    if not checked:
        return None
    detail = (
        "; ".join(problems) if problems else f"every FP32/FP16 engine agrees with PyTorch ({checked} checks)"
    )
    return IntrinsicGate(name="engine-parity", passed=not problems, detail=detail)


COVERAGE = "evaluated-and-gated"
#: The recipe key (and ``--allow-unverified`` of ``gate``) that lets an ungated run pass.
OPT_OUT = "allow_unverified"


def coverage_gate(
    report: Report, gates: list[GateResult], *, allow_unverified: bool = False
) -> IntrinsicGate:
    """``evaluated-and-gated``: a verdict rests on at least one gate and at least one evaluation
    of an exported file (a runtime other than PyTorch, on at least one image).

    Without either, every other gate passes vacuously ("every logit finite in 0 evaluations"),
    so the run would pass having checked nothing. ``allow_unverified`` (the recipe key, or
    ``gate --allow-unverified``) passes it anyway, saying so, for exploratory runs.
    """
    exported = [e for e in report.evaluations if e.runtime != "torch" and e.samples > 0]
    missing = []
    if not gates:
        missing.append("no gates (the recipe's gates, or the --policy file's, list none): add gates")
    if not exported:
        missing.append(
            "no evaluation of an exported file (validate.runtimes lists none, or none ran on an image): "
            "add onnxruntime to validate.runtimes"
        )
    if not missing:
        images = sum(e.samples for e in exported)
        files = "evaluation of an exported file" if len(exported) == 1 else "evaluations of exported files"
        detail = f"{_count(len(gates), 'gate')} on {len(exported)} {files} ({images} images)"
        return IntrinsicGate(name=COVERAGE, passed=True, detail=detail)
    if allow_unverified:
        return IntrinsicGate(
            name=COVERAGE, passed=True, detail=f"allowed by {OPT_OUT}: " + "; ".join(missing)
        )
    detail = "; ".join(missing) + f"; or, for a run that is not a release, set {OPT_OUT}: true (recipe)"
    return IntrinsicGate(name=COVERAGE, passed=False, detail=detail + " / --allow-unverified (gate)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def verdict_gates(
    report: Report, gates: list[GateResult], *, allow_unverified: bool = False
) -> list[IntrinsicGate]:
    """Every intrinsic gate of ``report`` judged with ``gates``: :func:`intrinsic_gates` and
    :func:`coverage_gate`."""
    return [*intrinsic_gates(report), coverage_gate(report, gates, allow_unverified=allow_unverified)]


def _agrees(top1_agreement: float, max_abs_diff: float | None, need: float = 1.0) -> bool:
    """Agreement of at least ``need`` with finite differences; written so that a NaN anywhere fails."""
    return top1_agreement >= need and max_abs_diff is not None and math.isfinite(max_abs_diff)


def verdict(gates: list[GateResult], intrinsic: list[IntrinsicGate]) -> bool:
    """``passed``: every recipe gate and every intrinsic gate passed."""
    return all(g.passed for g in gates) and all(g.passed for g in intrinsic)
