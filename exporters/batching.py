"""Run a fixed-batch engine on batches of any size.

Deployed engines often have a static batch (a TensorRT engine built for batch 1, an ONNX file
exported without a dynamic axis). The suites feed batches of their own size and Square shrinks
its batch as images are fooled, so such an engine is wrapped: each batch is split into chunks
of the engine's size and the last chunk is padded (with copies of its first image), and only
the real rows of the output are kept.
"""

from __future__ import annotations

import torch

from exporters.base import InputSpec, Runner
from exporters.outputs import Outputs, concat, take


class FixedBatchRunner(Runner):
    """A Runner with a dynamic batch in front of one whose batch size is fixed."""

    def __init__(self, inner: Runner) -> None:
        if inner.input_spec.batch is None:
            raise ValueError(f"{inner.name} already takes any batch size; no adapter needed")
        spec = inner.input_spec
        super().__init__(
            input_spec=InputSpec(spec.channels, spec.height, spec.width, None),
            precision=inner.precision,
            device=inner.device,
        )
        self.inner = inner
        self.runtime = inner.runtime  # reported as the engine it wraps
        self.chunk = int(spec.batch)  # type: ignore[arg-type]  # checked above

    def _run(self, x: torch.Tensor) -> Outputs:
        outputs = []
        for start in range(0, x.shape[0], self.chunk):
            part = x[start : start + self.chunk]
            real = part.shape[0]
            if real < self.chunk:
                part = torch.cat([part, part[:1].expand(self.chunk - real, *part.shape[1:])])
            outputs.append(take(self.inner(part.contiguous()), 0, real))
        return concat(outputs)


def any_batch(runner: Runner) -> Runner:
    """``runner`` itself if it takes any batch size, else wrapped in :class:`FixedBatchRunner`."""
    return runner if runner.input_spec.batch is None else FixedBatchRunner(runner)
