"""Gate results for CI systems: JUnit XML (any CI) and GitHub Actions ``::error::`` annotations."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

from toolchain.report.schema import GateResult, IntrinsicGate
from toolchain.rundir import atomic_path


def _cases(gates: list[GateResult], intrinsic: list[IntrinsicGate]) -> list[tuple[str, str | None]]:
    """``(test case name, failure message or None)`` for every intrinsic and recipe gate."""
    cases: list[tuple[str, str | None]] = [
        (f"intrinsic {g.name}", None if g.passed else g.detail) for g in intrinsic
    ]
    for g in gates:
        value = "missing" if g.value is None else f"{g.value:.6g}"
        failure = None if g.passed else g.error or f"value {value} does not satisfy {g.op} {g.threshold:g}"
        cases.append((f"{g.metric} {g.op} {g.threshold:g}", failure))
    return cases


def write_junit(path: Path, gates: list[GateResult], intrinsic: list[IntrinsicGate] | None = None) -> None:
    """One ``<testcase>`` per gate; a failed or missing metric becomes a ``<failure>``."""
    cases = _cases(gates, intrinsic or [])
    failures = sum(f is not None for _, f in cases)
    suite = ET.Element("testsuite", name="robustprune.gates", tests=str(len(cases)), failures=str(failures))
    for name, failure in cases:
        case = ET.SubElement(suite, "testcase", classname="robustprune.gates", name=name)
        if failure is not None:
            ET.SubElement(case, "failure", message=failure).text = failure
    with atomic_path(path) as tmp:
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)


def _escape_annotation(text: str, *, prop: bool = False) -> str:
    # GitHub's workflow-command escaping: messages escape %, CR, LF; properties also : and ,.
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github_annotations(gates: list[GateResult], intrinsic: list[IntrinsicGate], where: str) -> list[str]:
    """``::error::`` lines for GitHub Actions, one per failed gate.

    Args:
        gates, intrinsic: the evaluated gates.
        where: the report the gates were checked on (shown in the annotation's title).
    """
    return [
        f"::error title={_escape_annotation(f'robustprune gate failed ({where})', prop=True)}::"
        f"{_escape_annotation(name)}: {_escape_annotation(failure)}"
        for name, failure in _cases(gates, intrinsic)
        if failure is not None
    ]
