"""bench/aer.py end to end on a tiny setting: every method present in its JSON, plots written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_aer_benchmark_runs_every_method_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "aer.json"
    cmd = [sys.executable, str(REPO / "bench" / "aer.py"), "--dataset", "signs", "--setting", "tiny"]
    cmd += ["--budgets", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    methods = {run["method"] for run in payload["runs"]}
    criteria = {"magnitude", "taylor", "adv-taylor"}
    assert methods == criteria | {"hydra", "bap", "dnr", "gated", "mrs", "lowrank", "channels+lowrank"}
    for run in payload["runs"]:
        assert run["target_met"], run
        assert 0.0 <= run["pgd20"] <= run["clean"] <= 1.0
        assert run["ort_p50_ms_b1"] > 0 and run["macs"] < payload["dense"]["0"]["macs"]
    for key in ("clean", "pgd20", "corruptions_mean"):
        assert (tmp_path / f"aer-{key}.png").stat().st_size > 1000
    # A second invocation finds every run finished and redoes none of them.
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "work").rglob("report.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and json.loads(out.read_text())["runs"] == payload["runs"]
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    # --collect with a budget never run starts nothing and writes only the finished runs.
    collected = tmp_path / "collected.json"
    cmd_collect = [*cmd[:-1], str(collected), "--budgets", "2", "64", "--collect"]
    proc = subprocess.run(cmd_collect, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(collected.read_text())["runs"] == payload["runs"]
    assert not list((tmp_path / "work").rglob("*-x64-*"))
    # A new run in a new invocation copies an earlier run's dense model instead of training one.
    cmd_new = [*cmd[:-1], str(tmp_path / "new.json"), "--methods", "magnitude", "--budgets", "3"]
    proc = subprocess.run(cmd_new, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "magnitude-x3-s0: dense model from" in proc.stderr
    new, old = (
        json.loads(next((tmp_path / "work").rglob(f"{name}/train/stage.json")).read_text())
        for name in ("magnitude-x3-s0", "magnitude-x2-s0")
    )
    assert new == old  # the same stage record (key, checksums, timing): copied, not retrained
    # Another recipe in the same work directory is refused (exit 2), not taken for the finished run.
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "work").rglob("report.json")}
    proc = subprocess.run(
        [*cmd_new, "--dense-lr", "0.07"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2 and "holds a finished run of another recipe" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert {p: p.stat().st_mtime for p in stamps} == stamps


def test_aer_shared_dense_seeds_start_from_one_model_and_test_on_the_same_images(tmp_path: Path) -> None:
    out = tmp_path / "aer.json"
    cmd = [sys.executable, str(REPO / "bench" / "aer.py"), "--dataset", "signs", "--setting", "tiny"]
    cmd += ["--methods", "magnitude", "--budgets", "2", "--seeds", "0", "1", "--seeds-at", "2"]
    cmd += ["--shared-dense", "--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["shared_dense"] and [run["seed"] for run in payload["runs"]] == [0, 1]
    # Same dense weights evaluated on the same images: the deterministic numbers agree exactly.
    dense = payload["dense"]
    for key in ("clean", "corruptions_mean", "macs", "params"):
        assert dense["0"][key] == dense["1"][key], key
    # ...and seed 1 trained no dense model of its own: it starts from seed 0's, for 0 epochs.
    runs = tmp_path / "work" / "signs-tiny-test"
    seed1 = yaml.safe_load((runs / "magnitude-x2-s1" / "recipe.yaml").read_text())
    assert seed1["train"]["epochs"] == 0
    assert Path(seed1["model"]["checkpoint"]) == runs / "magnitude-x2-s0" / "train" / "model.pt"


def test_aer_runs_each_method_with_each_finetuning_loss_from_one_dense_model(tmp_path: Path) -> None:
    out = tmp_path / "aer.json"
    cmd = [sys.executable, str(REPO / "bench" / "aer.py"), "--dataset", "signs", "--setting", "tiny"]
    cmd += ["--methods", "magnitude", "--losses", "pgd", "rslad+corr", "--budgets", "2"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert [(r["method"], r["pruning"], r["loss"]) for r in payload["runs"]] == [
        ("magnitude", "magnitude", "pgd"),
        ("magnitude/rslad+corr", "magnitude", "rslad+corr"),
    ]
    assert set(payload["summary"]) == {"magnitude@2", "magnitude/rslad+corr@2"}
    runs = tmp_path / "work" / "signs-tiny-test"
    plain, distilled = (
        yaml.safe_load((runs / name / "recipe.yaml").read_text())
        for name in ("magnitude-x2-s0", "magnitude-rslad_corr-x2-s0")
    )
    assert plain["finetune"]["loss"] == "pgd"
    assert (
        distilled["finetune"]["loss"] == "rslad"
        and distilled["finetune"]["distill"]["corruption_weight"] == 1
    )
    assert distilled["prune"] == plain["prune"]  # the same pruning; only the fine-tuning differs
    trained = [
        json.loads((runs / name / "train" / "stage.json").read_text())
        for name in (plain["name"], distilled["name"])
    ]
    assert trained[0] == trained[1]  # one dense model, copied into the second run
