"""Trial runs (what ``bench/zoo.py`` runs per torchvision model and ``inspect --trial`` runs):
small models with a channel shuffle, auxiliary outputs and attention go through the whole
pipeline; the others stop before training with their reason, or fail with the stage named."""

from __future__ import annotations

import pytest

from toolchain.trial import run_trial

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(
    "arch",
    [
        "tests.tiny_models:tiny_shufflenet",  # channel shuffles and chunks
        "tests.tiny_models:AuxNet",  # (logits, aux_logits) in train mode
        "tests.tiny_models:tiny_vit",  # attention heads, class token, hidden_dim
        "tests.tiny_models:TinyGhostNet",  # Ghost modules: folded groups left alone
        "tests.tiny_models:MultiplierNet",  # a depthwise conv with a channel multiplier
    ],
)
def test_small_models_prune_export_and_validate(arch: str, tmp_path) -> None:
    result = run_trial(arch, 16, tmp_path)
    assert result.outcome == "works", result.reason
    assert result.target_met and result.macs_reduction == pytest.approx(2.0, rel=0.05)
    assert result.macs is not None and result.dense_macs is not None and result.macs < result.dense_macs
    assert result.top1_agreement == 1.0 and result.parity_max_abs_diff is not None
    assert result.parity_max_abs_diff <= max(1e-3, 1e-5 * (result.logit_scale or 0.0))


def test_a_budget_out_of_reach_is_refused_before_training(tmp_path) -> None:
    result = run_trial("tests.user_models:make", 16, tmp_path, reduction=50.0)
    assert (result.outcome, result.stage) == ("refused", "preflight")
    assert result.reason is not None and "macs_reduction 50 is out of reach" in result.reason
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_failure_after_training_started_names_the_stage(tmp_path, monkeypatch) -> None:
    import toolchain.stages.export

    def broken_export(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("exporter crashed\nsecond line")

    monkeypatch.setattr(toolchain.stages.export, "export_onnx", broken_export)
    result = run_trial("tests.user_models:make", 16, tmp_path)
    assert (result.outcome, result.stage) == ("failed", "export")
    assert result.reason == "RuntimeError: exporter crashed"
    assert result.target_met is None


def test_parity_beyond_atol_is_judged_against_float64(tmp_path, monkeypatch) -> None:
    """With no logit difference allowed, the float64 record decides: ONNX Runtime as close to the
    float64 model as float32 PyTorch is passes; a shifted engine fails."""
    import toolchain.trial
    from exporters.ort_runner import OnnxRuntimeRunner

    real = toolchain.trial.trial_recipe

    def strict(*args: object, **kwargs: object):
        recipe = real(*args, **kwargs)  # type: ignore[arg-type]
        return recipe.model_copy(update={"export": recipe.export.model_copy(update={"parity_atol": 1e-12})})

    monkeypatch.setattr(toolchain.trial, "trial_recipe", strict)
    monkeypatch.setattr(toolchain.trial, "PARITY_RTOL", 0.0)
    result = run_trial("tests.user_models:make", 16, tmp_path / "a")
    assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff > 0.0
    assert result.float64_engine_diff is not None and result.float64_torch_diff is not None
    assert result.outcome == "works", result.reason

    run = OnnxRuntimeRunner._run

    def shifted(self, x):  # type: ignore[no-untyped-def]
        return run(self, x) + 1e-3

    monkeypatch.setattr(OnnxRuntimeRunner, "_run", shifted)
    result = run_trial("tests.user_models:make", 16, tmp_path / "b")
    assert result.float64_engine_diff is not None and result.float64_engine_diff >= 1e-3
    assert result.outcome == "failed" and "ONNX Runtime differs" in (result.reason or "")
