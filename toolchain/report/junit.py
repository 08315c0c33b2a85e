"""Gate results as JUnit XML, so any CI system shows each gate as a test case."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from toolchain.rundir import atomic_path


def write_junit(path: Path, results: list[dict[str, Any]]) -> None:
    """One ``<testcase>`` per gate; a failed or missing metric becomes a ``<failure>``."""
    failures = sum(not r["passed"] for r in results)
    suite = ET.Element("testsuite", name="robustprune.gates", tests=str(len(results)), failures=str(failures))
    for row in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname="robustprune.gates",
            name=f"{row['metric']} {row['op']} {row['threshold']:g}",
        )
        if not row["passed"]:
            value = "missing" if row["value"] is None else f"{row['value']:.6g}"
            message = row.get("error") or f"value {value} does not satisfy {row['op']} {row['threshold']:g}"
            ET.SubElement(case, "failure", message=message).text = message
    with atomic_path(path) as tmp:
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
