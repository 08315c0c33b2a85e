"""Deterministic crash points, so tests can SIGKILL a run at an exact place instead of racing a timer.

With ``ROBUSTPRUNE_KILL_AT=<point>[@<n>]`` in the environment, the process sends itself
SIGKILL the ``n``-th time (default the first) it passes ``point``; without it (every real run)
:func:`killpoint` returns at once. SIGKILL cannot be caught, so what a test sees afterwards is
exactly what a killed run leaves on disk. Points:

* ``step:<desc>`` after each optimiser step of the training loop labelled ``desc``
  (``train``, ``finetune``, ``recover <i>``, or a method's name: ``hydra``, ``gated``, ...);
* ``stage:<name>`` after a stage has written its artifacts, before its ``stage.json``;
* ``write:<file>`` after a file written through :func:`toolchain.rundir.atomic_path` is
  complete under its temporary name, before it is renamed into place.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "ROBUSTPRUNE_KILL_AT"
_passed: dict[str, int] = {}


def killpoint(point: str) -> None:
    """SIGKILL this process if ``ROBUSTPRUNE_KILL_AT`` names ``point`` and its count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] == int(nth or 1):
        sys.stderr.write(f"robustprune: {ENV}={spec}: killing this process (SIGKILL)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
