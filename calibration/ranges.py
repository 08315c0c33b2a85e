"""Activation ranges for static INT8: collect each tensor's values on the calibration images,
then choose the range its 8-bit grid covers.

Min/max keeps every value representable but spends the grid on rare outliers; the other
methods clip the tails so the common values get finer steps:

* ``minmax``: the observed minimum and maximum.
* ``percentile``: the central ``percentile`` % of the values (both tails cut equally; a tensor
  with no negative value keeps 0 as its low end).
* ``entropy``: the clipping threshold whose 128-level quantised histogram is closest to the
  observed one in KL divergence (Migacz, "8-bit Inference with TensorRT", GTC 2017), searched
  over the magnitude histogram. Our deviation: exact zeros are left out (they are exact on any
  grid, and a ReLU's spike of them otherwise decides the threshold).
* ``mse``: the range (the observed one scaled towards zero) that minimises the expected squared
  error of 8-bit rounding plus clipping over the observed histogram (as NVIDIA's
  pytorch-quantization ``mse`` calibrator does for a symmetric amax).

Values are kept as one histogram per tensor (:data:`BINS` bins over ``[-A, A]`` for a tensor
with negative values, ``A`` its largest magnitude, ``[0, max]`` otherwise), so memory does not
grow with the calibration set. The ranges are written into ONNX Runtime's quantiser as a
calibration cache (:func:`calibration.qdq.quantize_onnx`), so the Q/DQ file is the one
ONNX Runtime's own tools would write with these ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from exporters.errors import UnknownNameError

__all__ = [
    "BINS",
    "RANGE_METHODS",
    "Histogram",
    "calibration_tensors",
    "collect_histograms",
    "compute_range",
    "range_methods",
]

#: Histogram bins per tensor (grid steps of an 8-bit range are ~8 bins wide at minmax).
BINS = 2048
#: Integer levels of an 8-bit grid.
LEVELS = 255
_ENTROPY_LEVELS = 128


@dataclass
class Histogram:
    """The values one tensor took on the calibration images.

    Attributes:
        low, high: the observed minimum and maximum.
        counts: ``BINS`` counts over ``edges``.
        edges: ``BINS + 1`` bin edges: ``[-A, A]`` when ``low < 0`` (``A = max(|low|, |high|)``,
            so the magnitude histogram is a fold), else ``[0, high]``.
        zeros: how many values were exactly 0 (a ReLU's off units), also counted in ``counts``.
    """

    low: float
    high: float
    counts: np.ndarray
    edges: np.ndarray
    zeros: float = 0.0

    @classmethod
    def of(cls, batches: Iterable[np.ndarray], low: float, high: float) -> Histogram:
        """The histogram of ``batches`` (all of one tensor) given its observed ``low`` and ``high``."""
        h = cls(float(low), float(high), np.zeros(BINS), cls.edges_for(low, high))
        for values in batches:
            h.add(values)
        return h

    @staticmethod
    def edges_for(low: float, high: float) -> np.ndarray:
        top = max(abs(low), abs(high), float(np.finfo(np.float32).tiny))
        return np.linspace(-top if low < 0 else 0.0, top, BINS + 1)

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (exact zeros also apart: see ``zeros``)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        self.counts += np.histogram(flat, bins=self.edges)[0]
        self.zeros += float(np.count_nonzero(flat == 0))

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1), interpolated linearly inside its bin."""
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)]) / max(self.counts.sum(), 1.0)
        return float(np.clip(np.interp(q, cdf, self.edges), self.low, self.high))

    def magnitudes(self, *, without_zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Counts and edges of ``|x|`` (the negative half folded onto the positive one);
        ``without_zeros``: exact zeros taken out of the first bin."""
        if self.edges[0] >= 0:
            counts, edges = self.counts.copy(), self.edges
        else:
            half = BINS // 2
            counts, edges = self.counts[half:] + self.counts[:half][::-1], self.edges[half:]
        if without_zeros:
            counts[0] = max(counts[0] - self.zeros, 0.0)
        return counts, edges


RangeMethod = Callable[[Histogram, float], tuple[float, float]]
RANGE_METHODS: dict[str, RangeMethod] = {}


def _register(name: str) -> Callable[[RangeMethod], RangeMethod]:
    def wrap(fn: RangeMethod) -> RangeMethod:
        RANGE_METHODS[name] = fn
        return fn

    return wrap


def range_methods() -> list[str]:
    """The calibration methods, by name."""
    return sorted(RANGE_METHODS)


def compute_range(method: str, histogram: Histogram, percentile: float = 99.99) -> tuple[float, float]:
    """The ``(low, high)`` range ``method`` gives a tensor with ``histogram``.

    Raises:
        UnknownNameError: no such method.
    """
    if method not in RANGE_METHODS:
        raise UnknownNameError("calibration method", method, range_methods())
    if histogram.high <= histogram.low:  # a constant tensor: nothing to clip
        return histogram.low, histogram.high
    return RANGE_METHODS[method](histogram, percentile)


@_register("minmax")
def _minmax(h: Histogram, percentile: float) -> tuple[float, float]:
    return h.low, h.high


@_register("percentile")
def _percentile(h: Histogram, percentile: float) -> tuple[float, float]:
    tail = (1 - percentile / 100) / 2
    low = h.quantile(tail) if h.low < 0 else h.low
    high = h.quantile(1 - tail if h.low < 0 else 1 - 2 * tail)
    return low, high


@_register("entropy")
def _entropy(h: Histogram, percentile: float) -> tuple[float, float]:
    # Exact zeros (half of a ReLU's outputs) are exact on every 8-bit grid: left in, their spike
    # in the first bin dominates the divergence and drives the threshold to the smallest tried.
    counts, edges = h.magnitudes(without_zeros=True)
    best, best_kl = len(counts), np.inf
    # Every 8th bin from the 128-level grid up: thresholds finer than the grid change nothing.
    for stop in range(_ENTROPY_LEVELS, len(counts) + 1, 8):
        kl = _clipped_kl(counts, stop)
        if kl < best_kl:
            best, best_kl = stop, kl
    threshold = float(edges[best])
    return max(h.low, -threshold), min(h.high, threshold)


def _clipped_kl(counts: np.ndarray, stop: int) -> float:
    """KL(P || Q) of a clipping at bin ``stop``: P the histogram up to it with the clipped tail
    added to its last bin; Q the values inside (no tail) merged into 128 levels and spread
    evenly over each level's non-empty bins, so Q misses the clipped mass and a threshold that
    cuts much loses."""
    inside = counts[:stop].astype(np.float64)
    reference = inside.copy()
    reference[-1] += counts[stop:].sum()
    expanded = np.zeros(stop)
    for group in np.array_split(np.arange(stop), _ENTROPY_LEVELS):
        nonzero = group[reference[group] > 0]
        if len(nonzero):
            expanded[nonzero] = inside[group].sum() / len(nonzero)
    keep = reference > 0
    p = reference[keep] / reference.sum()
    q = np.maximum(expanded[keep] / max(expanded.sum(), 1e-12), 1e-12)  # a level with only tail
    return float(np.sum(p * np.log(p / q)))


@_register("mse")
def _mse(h: Histogram, percentile: float) -> tuple[float, float]:
    low, high = min(h.low, 0.0), max(h.high, 0.0)
    best, best_err = 1.0, np.inf
    for scale in np.linspace(0.01, 1.0, 100):
        err = expected_squared_error(h, low * scale, high * scale)
        if err < best_err:
            best, best_err = float(scale), err
    return max(h.low, low * best), min(h.high, high * best)


def expected_squared_error(h: Histogram, low: float, high: float) -> float:
    """Mean squared error of an 8-bit grid over ``[low, high]`` on the histogram's values: the
    rounding error (step² / 12) inside the range, the clipping distance outside it."""
    step = (high - low) / LEVELS
    centers = h.centers
    inside = (centers >= low) & (centers <= high)
    clipped = np.clip(centers, low, high)
    err = np.where(inside, step**2 / 12, (centers - clipped) ** 2)
    return float((err * h.counts).sum() / max(h.counts.sum(), 1.0))


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """The float tensors a static quantiser may need a range for: every input and output of a
    node that is not a weight (an initializer), in graph order."""
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    weights = {init.name for init in model.graph.initializer}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            info = infos.get(name)
            if name in weights or info is None or not info.type.HasField("tensor_type"):
                continue
            if info.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                names[name] = None
    return list(names)


def collect_histograms(
    model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], tensors: Sequence[str]
) -> dict[str, Histogram]:
    """Run ``model`` (with ``tensors`` made outputs) on ``feeds`` twice: once for each tensor's
    minimum and maximum, once for its histogram over them."""
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    outputs = {o.name for o in augmented.graph.output}
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    augmented.graph.output.extend(infos[t] for t in tensors if t not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    session = ort.InferenceSession(
        augmented.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = list(tensors)

    def passes() -> Iterable[dict[str, np.ndarray]]:
        for feed in feeds:
            yield dict(zip(names, session.run(names, feed)))

    low = {n: np.inf for n in names}
    high = {n: -np.inf for n in names}
    for values in passes():
        for n, v in values.items():
            low[n], high[n] = min(low[n], float(v.min())), max(high[n], float(v.max()))
    histograms = {
        n: Histogram(low[n], high[n], np.zeros(BINS), Histogram.edges_for(low[n], high[n])) for n in names
    }
    for values in passes():
        for n, v in values.items():
            histograms[n].add(v)
    return histograms
