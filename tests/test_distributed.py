"""Under torchrun: two CPU processes (gloo) train data-parallel, are killed mid-epoch and resume,
and validate one model each; the result is the single-process run's.

The recipe's model has no BatchNorm (per-rank batch statistics would differ from the global
batch's, and SyncBatchNorm needs CUDA) and its attacks no random start (each rank draws its own),
so the two runs compute the same gradients up to floating-point summation order. Stated
tolerance: per-epoch losses within 1e-5 (relative; measured at most 1.0e-6), every weight of
every stage within 5e-5 (absolute; measured at most 4.7e-6, after fine-tuning), and the
report's accuracies exactly equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import one_torch_thread
from toolchain import distributed
from toolchain.pipeline import run_pipeline
from toolchain.recipe import recipe_from_dict
from toolchain.training import make_loader

NO_RANDOM_START = {"eps": "2/255", "step_size": "1/255", "steps": 1, "random_start": False}
DDP_RECIPE: dict[str, Any] = {
    "version": 1,
    "name": "ddp",
    "seed": 5,
    "device": "cpu",
    "data": {"dataset": "signs", "image_size": 16, "train_samples": 96, "val_samples": 32, "batch_size": 24},
    "model": {"arch": "tests.user_models:make_plain"},
    "train": {"epochs": 3, "lr": 0.2, "loss": "pgd", "attack": NO_RANDOM_START},
    "prune": {
        "criterion": "magnitude",
        "steps": 1,
        "target": {"macs_reduction": 2.0},
        "bn_recalibration_batches": 0,
    },
    "finetune": {"epochs": 2, "lr": 0.05, "loss": "trades", "attack": NO_RANDOM_START},
    "export": {"parity_samples": 16},
    "validate": {
        "samples": 32,
        "batch_size": 16,
        "attacks": [{"name": "pgd", "eps": "4/255", "steps": 2}],
        "corruptions": {"names": ["gaussian_noise"], "severities": [3]},
    },
    "bench": {"enabled": False},
    # A run with no gate does not pass (the intrinsic evaluated-and-gated gate).
    "gates": [{"metric": "models.pruned.macs_reduction", "threshold": 1.0}],
}


def test_shards_together_are_the_single_process_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(48).float(), torch.zeros(48))
    whole = make_loader(data, 12, shuffle=True, seed=7)
    single = [[set(x.int().tolist()) for x, _ in whole] for _epoch in range(2)]
    shards = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "current", lambda rank=rank: distributed.World(rank, 3))
        loader = make_loader(data, 12, shuffle=True, seed=7, shard=True)
        assert loader.batch_size == 4
        shards.append([[x.int().tolist() for x, _ in loader] for _epoch in range(2)])
    for epoch in range(2):  # each epoch reshuffles, identically on every rank
        union = [{i for s in shards for i in s[epoch][step]} for step in range(4)]
        assert union == single[epoch]
    assert single[0] != single[1]
    monkeypatch.setattr(distributed, "current", lambda: distributed.World(0, 5))
    with pytest.raises(distributed.UserError, match="batch_size 12 is not a multiple of the 5 processes"):
        make_loader(data, 12, shuffle=True, shard=True)


def test_uneven_shards_are_padded_to_the_same_number_of_steps() -> None:
    from torch.utils.data import SequentialSampler

    from toolchain.training.sampling import ShardSampler

    shards = [list(ShardSampler(SequentialSampler(range(7)), rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]  # 7 images, padded with the first two


def _weights(root: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(root / stage / "model.pt", weights_only=True)["state_dict"]


def _epochs(root: Path, stage: str) -> list[dict[str, float]]:
    return json.loads((root / stage / "stage.json").read_text())["result"]["epochs"]


@pytest.mark.e2e
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing"
)
def test_two_processes_under_torchrun_match_one(tmp_path: Path) -> None:
    recipe_path = tmp_path / "ddp.yaml"
    recipe_path.write_text(yaml.safe_dump(DDP_RECIPE))
    single = tmp_path / "single"
    with one_torch_thread():  # torchrun gives each worker one thread
        reference = run_pipeline(recipe_from_dict(DDP_RECIPE), single, progress=False).to_json()

    parallel = tmp_path / "parallel"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "toolchain", "run", str(recipe_path), "--out", str(parallel), "--no-progress"]
    # Both ranks SIGKILL themselves at step 6 of 12 (mid epoch 2); the rerun resumes after epoch 1.
    killed = subprocess.run(
        command,
        env={**env, "ROBUSTPRUNE_KILL_AT": "step:train@6"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode != 0 and killed.stderr.count("killing this process (SIGKILL)") == 2
    assert (parallel / "train" / ".checkpoint.pt").is_file()
    # --debug: rank 1 logs too, so the test sees which rank evaluated which model.
    debug = [*command[:-5], "--debug", *command[-5:]]
    result = subprocess.run(debug, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: resuming after epoch 1/3" in result.stderr
    assert "validate: rank 0 of 2 evaluates dense" in result.stderr
    assert "validate: rank 1 of 2 evaluates pruned" in result.stderr  # evaluation sharded, then gathered
    assert result.stdout.count("robustprune: ddp") == 1  # only rank 0 prints the summary

    report = json.loads((parallel / "report.json").read_text())
    for stage in ("train", "finetune"):
        for a, b in zip(_epochs(single, stage), _epochs(parallel, stage), strict=True):
            assert a["accuracy"] == b["accuracy"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for stage in ("train", "prune", "finetune"):
        a, b = _weights(single, stage), _weights(parallel, stage)
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 5e-5, stage
    sizes = ("macs", "params", "channels", "macs_reduction", "target_met")
    for model in ("dense", "pruned"):  # the same channels removed
        assert {k: report["models"][model].get(k) for k in sizes} == {
            k: reference["models"][model].get(k) for k in sizes
        }
    assert [(e["model"], e["runtime"], e["clean_accuracy"], e["attacks"]) for e in report["evaluations"]] == [
        (e["model"], e["runtime"], e["clean_accuracy"], e["attacks"]) for e in reference["evaluations"]
    ]
    assert reference["evaluations"][2]["clean_accuracy"] > 1 / 12  # the pruned model learned something
    # Rank 1 wrote nothing of its own: the same files as the single-process run.
    names = {str(p.relative_to(single)) for p in single.rglob("*")}
    assert {str(p.relative_to(parallel)) for p in parallel.rglob("*")} == names


def test_sync_batchnorm_round_trip_keeps_the_very_parameters() -> None:
    """SyncBatchNorm itself needs CUDA and several processes; its swap in and out is checked here."""
    from toolchain.models import build_model

    model = build_model("convnet", num_classes=4, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    x = torch.rand(2, 3, 16, 16)
    before = model(x)
    params = {name: p for name, p in model.named_parameters()}
    kinds = distributed.sync_batchnorm(model)
    assert kinds and all(isinstance(model.get_submodule(n), torch.nn.SyncBatchNorm) for n in kinds)
    assert torch.equal(model(x), before)  # eval mode: running statistics, no communication
    distributed.local_batchnorm(model, kinds)
    assert all(type(model.get_submodule(n)) is k for n, k in kinds.items())
    assert all(p is params[name] for name, p in model.named_parameters())
    assert torch.equal(model(x), before)
