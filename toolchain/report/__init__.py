"""report.json (the stable output CI reads), the human reports, plots, gates and comparisons."""

from toolchain.report.schema import SCHEMA

__all__ = ["SCHEMA"]
