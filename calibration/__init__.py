"""Calibration after compression: BatchNorm re-estimation and static INT8 (Q/DQ) quantisation.

Modules: ``bn`` (BatchNorm re-estimation after pruning), ``schemes`` (the INT8 scheme of each
target runtime), ``data`` (robustness-aware calibration sets: clean, corrupted, adversarial),
``qdq`` (ONNX Runtime static quantisation into a Q/DQ file), ``bias`` (bias correction of a
Q/DQ file: each INT8 layer's mean output shift taken out of its bias), ``qat`` and ``qat_export``
(quantisation-aware fine-tuning: fake-quantised layers, and their Q/DQ file with the trained
scales), ``fusion`` (how many convolutions ONNX Runtime really runs as integer kernels),
``parity`` (INT8 against FP32 on clean and perturbed inputs). A standalone library: it never
imports ``toolchain.pipeline``, and ONNX Runtime's quantisation tools load only when a file is
quantised.
"""

from calibration.bn import recalibrate_bn

__all__ = ["recalibrate_bn"]
