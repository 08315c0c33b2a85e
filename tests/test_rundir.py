"""The run directory: atomic writes, stage records and checksums, the lock, refusal to write
into foreign folders."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.errors import RunDirectoryError, RunLockedError
from toolchain.rundir import RunDir, atomic_path, chain_key, sha256_file


def test_stage_records_and_keys(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run", {"name": "x"}) as run:
        (run.stage_dir("train") / "model.pt").write_text("weights")
        assert run.finished("train", "k1", {}) is None
        run.finish("train", "k1", {}, ["model.pt"], {"macs": 5}, 1.0)
        assert run.finished("train", "k1", {})["result"] == {"macs": 5}
        assert run.finished("train", "k2", {}) is None  # the recipe changed
        (run.root / "train" / "model.pt").unlink()
        assert run.finished("train", "k1", {}) is None  # an artifact went missing


def test_a_stage_after_one_that_ran_again_is_not_finished(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run", {"name": "x"}) as run:
        (run.stage_dir("train") / "model.pt").write_text("weights")
        run.finish("train", "k1", {}, ["model.pt"], {}, 1.0)
        first = run.run_id("train")
        (run.stage_dir("prune") / "model.pt").write_text("pruned")
        run.finish("prune", "k2", {"train": first}, ["model.pt"], {}, 1.0)
        assert run.finished("prune", "k2", {"train": run.run_id("train")}) is not None
        # The same train stage runs again (same key, same bytes): a new run of it all the same.
        run.finish("train", "k1", {}, ["model.pt"], {}, 1.0)
        assert run.run_id("train") != first
        assert run.finished("prune", "k2", {"train": run.run_id("train")}) is None


def test_a_truncated_or_changed_artifact_is_never_taken_as_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with RunDir.open(tmp_path / "run", {"name": "x"}) as run:
        model = run.stage_dir("train") / "model.pt"
        model.write_bytes(b"weights" * 100)
        run.finish("train", "k", {}, ["model.pt"], {}, 1.0)
        record = run.finished("train", "k", {})
        assert record["checksums"] == {"model.pt": sha256_file(model)}
        assert run.verify("train", "model.pt")
        model.write_bytes(b"weights" * 50)  # truncated after the stage finished
        with caplog.at_level(logging.WARNING, logger="toolchain.rundir"):
            assert run.finished("train", "k", {}) is None
        assert "model.pt does not match the sha256 in stage.json" in caplog.text
        assert not run.verify("train", "model.pt")
        model.write_bytes(b"weights" * 100)
        assert run.finished("train", "k", {}) is not None  # the recorded bytes again
        record_path = run.root / "train" / "stage.json"
        record_path.write_text(record_path.read_text().replace('"checksums"', '"sums"'))
        assert run.finished("train", "k", {}) is None  # a record without checksums is not trusted


def test_chain_key_depends_on_every_part() -> None:
    assert chain_key("a", "b") != chain_key("a", "c") != chain_key("b", "b")


def test_reuse_own_folder_but_refuse_foreign_ones(tmp_path: Path) -> None:
    RunDir.open(tmp_path / "run", {"name": "x"}).close()
    RunDir.open(tmp_path / "run", {"name": "x"}).close()  # reopening a run is a resume
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


def test_a_second_open_while_the_first_holds_the_lock_is_refused(tmp_path: Path) -> None:
    first = RunDir.open(tmp_path / "run", {"name": "first"})
    with pytest.raises(RunLockedError, match=f"is in use by a running robustprune \\(pid {os.getpid()} on "):
        RunDir.open(tmp_path / "run", {"name": "second"})
    assert "first" in (tmp_path / "run" / "recipe.yaml").read_text()  # the holder's recipe is kept
    first.close()
    RunDir.open(tmp_path / "run", {"name": "second"}).close()  # free again once released


def test_a_lock_left_by_a_killed_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    code = (
        "import os, signal, sys; from toolchain.rundir import RunDir; "
        f"RunDir.open({str(root)!r}, {{}}); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -signal.SIGKILL
    assert (root / ".lock").read_text().startswith("pid ")  # it never released its lock
    with caplog.at_level(logging.WARNING, logger="toolchain.runlock"):
        RunDir.open(root, {}).close()
    assert "taking over the lock of pid" in caplog.text and "no longer running" in caplog.text
    assert (root / ".lock").read_text() == ""  # released cleanly this time


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(RunDirectoryError, match=r"cannot create run directory .*choose a writable --out"):
            RunDir.open(parent / "run", {})
    finally:
        parent.chmod(0o755)


def test_a_read_only_file_system_is_one_line_run_directory_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wherever chmod cannot make a folder read-only (root, CI containers): the same refusal,
    with the lock file's creation failing as it does on a read-only mount."""
    import errno

    import toolchain.runlock as runlock

    root = tmp_path / "run"
    RunDir.open(root, {"name": "x"}).close()
    before = {p.name: p.read_bytes() for p in root.iterdir()}

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(root / ".lock"))

    monkeypatch.setattr(runlock.os, "open", read_only)
    with pytest.raises(RunDirectoryError, match=r"cannot write in run directory .*\(Read-only file system\)"):
        RunDir.open(root, {"name": "y"})
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_temporary_files_of_killed_writes_are_removed_on_open(tmp_path: Path) -> None:
    RunDir.open(tmp_path / "run", {}).close()
    torn = tmp_path / "run" / "prune" / ".model.pt.abc123.tmp"
    torn.parent.mkdir()
    torn.write_bytes(b"half a model")
    keep = tmp_path / "run" / "prune" / "model.pt"
    keep.write_bytes(b"a model")
    RunDir.open(tmp_path / "run", {}).close()
    assert not torn.exists() and keep.read_bytes() == b"a model"
