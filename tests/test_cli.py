"""The command line: exit codes, one-line errors, nothing overwritten on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_RECIPE
from toolchain.cli import main


def _write(tmp_path: Path, recipe: dict[str, Any], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _patched(**sections: Any) -> dict[str, Any]:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    for key, value in sections.items():
        section, _, field = key.partition("__")
        recipe[section][field] = value
    return recipe


GATED_BAD_CORRUPTION = {"method": "gated", "gated": {"train": {"mixed": {"corruptions": ["x"]}}}}


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (dict(TINY_RECIPE, trian={}), "unknown key 'trian'"),
        (_patched(model__arch="resnet9000"), "unknown model 'resnet9000'; known: "),
        (_patched(prune__criterion="vibes"), "unknown pruning criterion 'vibes'; known: "),
        (_patched(data__dataset="imagenet-on-a-floppy"), "unknown dataset"),
        (_patched(model__checkpoint="/nonexistent/weights.pt"), "weights.pt"),
        (dict(TINY_RECIPE, device="cuda:0"), "CUDA is not available here; set device: cpu"),
        (_patched(prune__method="hydr"), "unknown pruning method 'hydr'; known: bap, dnr, gated, hydra"),
        (
            dict(TINY_RECIPE, prune={"method": "hydra", "hydra": {"train": {"epoch": 1}}}),
            "unknown key 'prune.hydra.train.epoch'",
        ),
        (_patched(prune__target={"macs_reduction": 500.0}), "macs_reduction 500 is out of reach"),
        (
            dict(TINY_RECIPE, prune=GATED_BAD_CORRUPTION),
            "unknown corruption 'x'",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: dict[str, Any], expected: str
) -> None:
    out = tmp_path / "run"
    code = main(["run", str(_write(tmp_path, recipe)), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if line.startswith("robustprune: error:")] == [err[-1]]
    assert expected in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()  # nothing written for a recipe that does not validate


def test_checkpoint_that_does_not_fit_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    bad = tmp_path / "other.pt"
    torch.save({"net.weird.weight": torch.zeros(3)}, bad)
    code = main(
        ["run", str(_write(tmp_path, _patched(model__checkpoint=str(bad)))), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "other.pt" in capsys.readouterr().err


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "report.json").write_text('{"keep": true}')
    code = main(["run", str(_write(tmp_path, _patched(model__arch="nope"))), "--out", str(out)])
    assert code == 2
    assert (out / "report.json").read_text() == '{"keep": true}'
    code = main(["run", str(_write(tmp_path, TINY_RECIPE)), "--out", str(out)])
    assert code == 2  # not a robustprune run directory
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_usage_errors_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert main(["run", "/no/such/recipe.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_gate_command_exit_codes_and_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = {
        "schema": "robustprune.report/1",
        "status": "completed",
        "models": {"pruned": {"macs_reduction": 3.0, "target": {"macs_reduction": 3.0}, "target_met": True}},
        "evaluations": [{"model": "pruned", "runtime": "onnxruntime", "samples": 10, "nonfinite_logits": 0}],
        "gates": [],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"gates": [{"metric": "models.pruned.macs_reduction", "threshold": 2.5}]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"gates": [{"metric": "models.pruned.latency", "threshold": 1}]}))
    assert main(["gate", str(path), "--policy", str(ok)]) == 0
    assert main(["gate", str(path), "--policy", str(bad), "--junit", str(tmp_path / "j.xml")]) == 1
    assert 'failures="1"' in (tmp_path / "j.xml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"gates": [{"metrc": "x", "threshold": 1}]}))
    assert main(["gate", str(path), "--policy", str(typo)]) == 2
    assert main(["gate", str(tmp_path / "missing.json")]) == 2
    # Only the report of a completed run is a verdict: stale or unknown status is refused.
    for status in ("stale", None):
        path.write_text(json.dumps(dict(report, status=status)))
        capsys.readouterr()
        assert main(["gate", str(path), "--policy", str(ok)]) == 2
        assert "not the report of a completed run" in capsys.readouterr().err


def test_python_dash_m_and_lean_import() -> None:
    def imported_after(statement: str) -> list[str]:
        heavy = "('torch', 'onnxruntime', 'tensorrt')"
        code = f"import json, sys; {statement}; print(json.dumps([m for m in {heavy} if m in sys.modules]))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    # The recipe and the CLI front end stay light: validating a recipe or --help loads no torch.
    assert imported_after("import toolchain, toolchain.recipe, toolchain.cli") == []
    # The libraries never import TensorRT (nor initialise CUDA) just by being imported.
    assert "tensorrt" not in imported_after("import exporters, exporters.runtimes, toolchain.pipeline")
    help_out = subprocess.run(
        [sys.executable, "-m", "toolchain", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "run" in help_out and "validate" in help_out and "gate" in help_out
