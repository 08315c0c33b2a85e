"""The run directory: atomic writes, stage records, refusal to write into foreign folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.errors import RunDirectoryError
from toolchain.rundir import RunDir, atomic_path, chain_key


def test_stage_records_and_keys(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run", {"name": "x"})
    (run.stage_dir("train") / "model.pt").write_text("weights")
    assert run.finished("train", "k1") is None
    run.finish("train", "k1", ["model.pt"], {"macs": 5}, 1.0)
    assert run.finished("train", "k1")["result"] == {"macs": 5}
    assert run.finished("train", "k2") is None  # the recipe changed
    (run.root / "train" / "model.pt").unlink()
    assert run.finished("train", "k1") is None  # an artifact went missing


def test_chain_key_depends_on_every_part() -> None:
    assert chain_key("a", "b") != chain_key("a", "c") != chain_key("b", "b")


def test_reuse_own_folder_but_refuse_foreign_ones(tmp_path: Path) -> None:
    RunDir.open(tmp_path / "run", {"name": "x"})
    RunDir.open(tmp_path / "run", {"name": "x"})  # reopening a run is a resume
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("precious")
    with pytest.raises(RunDirectoryError, match="not a robustprune run directory"):
        RunDir.open(foreign, {"name": "x"})
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(RunDirectoryError, match="is a file"):
        RunDir.open(a_file, {})


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
