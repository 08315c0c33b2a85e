"""Calibration after compression: BatchNorm re-estimation (and, later, INT8 calibration data).

A standalone library: it depends on torch only, never on ``toolchain.pipeline``.
"""

from calibration.bn import recalibrate_bn

__all__ = ["recalibrate_bn"]
