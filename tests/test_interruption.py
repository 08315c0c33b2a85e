"""SIGKILL at several points of a run, then resume: the report equals an uninterrupted run's.

Also determinism: the same recipe and seed on the CPU give identical report numbers.

The kill points are deterministic (``ROBUSTPRUNE_KILL_AT``, :mod:`toolchain.killpoints`): the
subprocess sends itself SIGKILL after the n-th optimiser step of a named training loop, in the
middle of an atomic write, or after a stage wrote its artifacts and before its ``stage.json``,
so the test never races a timer. One tiny recipe (16 px, 96 training images, HYDRA as the
pruning method so that the in-the-loop training is interrupted too); the whole module takes
about 45 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import one_torch_thread
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict

pytestmark = pytest.mark.e2e

PGD1 = {"eps": "2/255", "step_size": "1/255", "steps": 1}
KILL_RECIPE: dict[str, Any] = {
    "version": 1,
    "name": "kill",
    "seed": 3,
    # 96 images in batches of 24: 4 optimiser steps per epoch.
    "data": {"dataset": "signs", "image_size": 16, "train_samples": 96, "val_samples": 32, "batch_size": 24},
    "model": {"arch": "convnet"},
    "train": {"epochs": 2, "lr": 0.05, "loss": "pgd", "attack": PGD1},
    "prune": {
        "method": "hydra",
        "target": {"macs_reduction": 2.0},
        "bn_recalibration_batches": 2,
        "hydra": {"train": {"epochs": 2, "lr": 0.1, "attack": PGD1}},
    },
    "finetune": {"epochs": 1, "lr": 0.01, "loss": "pgd", "attack": PGD1},
    "export": {"parity_samples": 16},
    "validate": {
        "samples": 32,
        "batch_size": 16,
        "attacks": [
            {"name": "pgd", "eps": "4/255", "steps": 2},
            {"name": "square", "eps": "4/255", "queries": 5, "samples": 8},
        ],
        "corruptions": {"names": ["gaussian_noise"], "severities": [3]},
    },
    "bench": {"enabled": False},
}
MODEL_STAGES = ("train", "prune", "finetune")


def numbers(report: dict[str, Any]) -> dict[str, Any]:
    """Everything a report says about the models, without wall times and the environment."""
    return {k: v for k, v in report.items() if k not in ("environment", "stage_seconds", "latency")}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two run directories' models (train, prune, finetune) are bit for bit equal.

    (The files' bytes differ: torch.save names the archive after the temporary file.)"""
    for stage in MODEL_STAGES:
        sa, sb = (torch.load(r / stage / "model.pt", weights_only=True)["state_dict"] for r in (a, b))
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted run, in this process on one torch thread (as the subprocesses run)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with one_torch_thread():
        report = run_pipeline(recipe_from_dict(KILL_RECIPE), out, progress=False)
    return out, report.to_json()


def test_same_recipe_and_seed_give_identical_numbers(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    with one_torch_thread():
        again = run_pipeline(recipe_from_dict(KILL_RECIPE), tmp_path / "again", progress=False).to_json()
    assert numbers(again) == numbers(reference[1])
    assert same_weights(tmp_path / "again", reference[0])
    assert reference[1]["evaluations"][0]["clean_accuracy"] > 0  # numbers, not an empty report


def _run(recipe: Path, out: Path, kill_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("ROBUSTPRUNE_KILL_AT", None)
    if kill_at:
        env["ROBUSTPRUNE_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "toolchain", "run", str(recipe), "--out", str(out), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _killed(result: subprocess.CompletedProcess[str], point: str) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert f"ROBUSTPRUNE_KILL_AT={point}: killing this process" in result.stderr


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_numbers(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(yaml.safe_dump(KILL_RECIPE))
    out = tmp_path / "run"

    # 1. Mid-epoch in dense training (step 6 of 8: epoch 1 is checkpointed, epoch 2 half done).
    _killed(_run(recipe, out, "step:train@6"), "step:train@6")
    assert (out / "train" / ".checkpoint.pt").is_file() and not (out / "train" / "stage.json").exists()

    # 2. Training resumes after epoch 1, then HYDRA's score training is killed mid epoch 2.
    run2 = _run(recipe, out, "step:hydra@6")
    _killed(run2, "step:hydra@6")
    assert "train: resuming after epoch 1/2" in run2.stderr
    assert (out / "train" / "stage.json").is_file() and not (out / "train" / ".checkpoint.pt").exists()
    assert (out / "prune" / ".checkpoint.pt").is_file() and not (out / "prune" / "stage.json").exists()

    # 3. HYDRA resumes after its epoch 1; killed while the pruned model.pt is being written: the
    # complete bytes sit under a temporary name, model.pt itself never exists half-written.
    run3 = _run(recipe, out, "write:model.pt")
    _killed(run3, "write:model.pt")
    assert "hydra: resuming after epoch 1/2" in run3.stderr
    assert "stage train    up to date, skipped" in run3.stderr
    assert not (out / "prune" / "model.pt").exists() and list((out / "prune").glob(".model.pt.*.tmp"))

    # 4. The prune stage runs again; killed after export wrote its files, before stage.json.
    _killed(_run(recipe, out, "stage:export"), "stage:export")
    assert (out / "export" / "pruned.onnx").is_file() and not (out / "export" / "stage.json").exists()
    assert (out / "report.json").is_file() is False  # no report before the run completes

    # A torn file where a finished stage's artifact was (a disk fault, a copy cut short): its
    # checksum no longer matches, so the stage runs again instead of reading it.
    finetuned = out / "finetune" / "model.pt"
    finetuned.write_bytes(finetuned.read_bytes()[:1000])

    # 5. Uninterrupted to the end.
    final = _run(recipe, out, None)
    assert final.returncode == (0 if reference[1]["passed"] else 1), final.stderr[-2000:]
    assert "stage finetune: model.pt does not match the sha256 in stage.json" in final.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert numbers(report) == numbers(reference[1])
    assert same_weights(out, reference[0])
    assert (out / ".lock").read_text() == ""  # every killed holder's lock was taken over and released
    assert not list(out.rglob(".*.tmp"))  # the torn write of step 3 was cleaned up
