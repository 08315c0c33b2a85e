"""report.json (the stable output CI reads), the human report, plots and gates."""

SCHEMA = "robustprune.report/1"
