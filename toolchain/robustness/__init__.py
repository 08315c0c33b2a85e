"""Robustness: attacks, corruptions and the suites that judge any Runner."""
