"""Training and in-the-loop pruning on CUDA: the tiny pipeline runs end to end on the GPU.
Skipped where CUDA is absent (CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RECIPE
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


@pytest.mark.parametrize("method", ["iterative", "dnr"])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_tiny_run_trains_on_cuda_exports_and_validates(method: str, amp: str, tmp_path: Path) -> None:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["device"] = "cuda"
    recipe["train"]["amp"] = amp
    if method == "dnr":
        recipe["prune"] = {
            "method": "dnr",
            "target": {"macs_reduction": 2.0},
            "dnr": {
                "train": {"epochs": 2, "amp": amp, "attack": {"eps": "2/255", "steps": 1}},
                "update_every": 4,
            },
        }
    report = run_pipeline(recipe_from_dict(recipe), tmp_path / "run", progress=False).to_json()
    pruned = report["models"]["pruned"]
    assert abs(pruned["macs_reduction"] / 2.0 - 1) <= 0.05
    (ort,) = [e for e in report["evaluations"] if e["model"] == "pruned" and e["runtime"] == "onnxruntime"]
    assert ort["parity"]["top1_agreement"] == 1.0 and ort["clean_accuracy"] > 1 / 12
