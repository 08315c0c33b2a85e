"""The validation suite: streamed evaluation, attack modes per runner, sample caps, robust
accuracy as the field defines it, like-with-like flags and NaN logits."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from exporters.base import InputSpec
from exporters.torch_runner import TorchRunner
from tests.test_attacks import make_data, trained_cnn
from tests.test_sanity import Quantised
from toolchain.recipe import ValidateConfig
from toolchain.report.gates import intrinsic_gates
from toolchain.report.schema import Report
from toolchain.robustness.attacks import ATTACKS, Attack, AttackResult
from toolchain.robustness.suite import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _config(**kw: object) -> ValidateConfig:
    base = {
        "attacks": [
            {"name": "pgd", "eps": "4/255", "steps": 2},
            {"name": "square", "eps": "4/255", "queries": 5, "samples": 12},
        ],
        "corruptions": {"names": ["gaussian_noise"], "severities": [1, 5]},
    }
    base.update(kw)
    return ValidateConfig.model_validate(base)


def _engine(model: nn.Module, spec: InputSpec) -> TorchRunner:
    runner = TorchRunner(model, spec)
    runner.runtime = "onnxruntime"  # a stand-in engine: any non-torch runtime
    return runner


def test_evaluation_is_streamed_batches_are_not_kept() -> None:
    """Memory must not grow with samples: each batch is released once it has been evaluated."""
    model = _model()
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_while_streaming: list[int] = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            gc.collect()
            alive_while_streaming.append(sum(r() is not None for r in refs))
            x = torch.rand(8, 3, 8, 8, generator=g)
            refs.append(weakref.ref(x))
            yield x, torch.randint(0, 3, (8,), generator=g)

    runners = {"torch": TorchRunner(model, InputSpec(3, 8, 8))}
    (ev,) = evaluate(model, runners, batches(), _config(), model_name="dense", progress=False)
    assert ev.samples == 48
    # At most the batch in hand (and the one the loop variable still names) is alive.
    assert max(alive_while_streaming) <= 2, alive_while_streaming


def test_modes_caps_and_counts() -> None:
    model = _model()
    spec = InputSpec(3, 8, 8)
    runners = {"torch": TorchRunner(model, spec), "copy": _engine(_model(), spec)}
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(3)]
    evs = evaluate(model, runners, data, _config(), model_name="pruned", progress=False)
    by_runtime = {e.runtime: e for e in evs}
    torch_ev, engine_ev = by_runtime["torch"], by_runtime["onnxruntime"]
    assert [a.mode for a in torch_ev.attacks] == ["white-box", "black-box"]
    assert [a.mode for a in engine_ev.attacks] == ["transfer", "black-box"]
    square = engine_ev.attacks[1]
    assert square.samples == 12 and 0 <= square.queries <= 5
    assert torch_ev.samples == engine_ev.samples == 30
    assert set(torch_ev.corruptions.per_corruption["gaussian_noise"]) == {"1", "5"}  # type: ignore[index]
    # Same weights and seed: the stand-in engine agrees with the reference exactly.
    assert engine_ev.parity.top1_agreement == 1.0 and engine_ev.parity.max_abs_diff == 0.0  # type: ignore[union-attr]
    assert engine_ev.nonfinite_logits == 0
    assert "engine-disagrees-with-torch" not in engine_ev.flags


def test_engine_disagreement_is_flagged() -> None:
    model = _model()
    spec = InputSpec(3, 8, 8)
    engine = _engine(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), spec)
    g = torch.Generator().manual_seed(2)
    data = [(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
    (ev,) = evaluate(
        model, {"onnxruntime": engine}, data, _config(attacks=[]), model_name="x", progress=False
    )
    assert ev.parity is not None and ev.parity.top1_agreement < 1.0
    assert "engine-disagrees-with-torch" in ev.flags


class _BrightestChannel(nn.Module):
    """Class = the channel with the largest mean: easy to misclassify on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x.mean(dim=(2, 3))


class _TowardsTheLabel(Attack):
    """A fake 'attack' that paints the label's channel white: it always lands on the label."""

    name = "towards-label"
    mode = "white-box"

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> AttackResult:
        x_adv = x.clone()
        x_adv[torch.arange(len(x)), y] = 1.0
        return AttackResult(x_adv)


def test_a_clean_wrong_image_never_counts_as_robust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ATTACKS._items, "towards-label", _TowardsTheLabel)
    model = _BrightestChannel()
    x = torch.full((6, 3, 4, 4), 0.2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x[torch.arange(6), y] = 0.6  # every image correct...
    x[3, 1], x[4, 2] = 0.9, 0.9  # ...except 3 and 4, whose brightest channel is another one
    runners = {
        "torch": TorchRunner(model, InputSpec(3, 4, 4)),
        "engine": _engine(_BrightestChannel(), InputSpec(3, 4, 4)),
    }
    cfg = _config(attacks=[{"name": "towards-label", "eps": 0.5}], corruptions={"names": []})
    for ev in evaluate(model, runners, [(x, y)], cfg, model_name="m", progress=False):
        assert ev.clean_accuracy == pytest.approx(4 / 6)
        # The attack "succeeds" in restoring the label of 3 and 4, yet they stay non-robust.
        assert ev.attacks[0].accuracy == pytest.approx(4 / 6), ev.runtime
        assert ev.robust_accuracy[0].accuracy == pytest.approx(4 / 6)


def test_attacks_leave_misclassified_images_alone() -> None:
    model, (x, y) = trained_cnn(), make_data(16, seed=4)
    wrong = (y + 1) % 4
    labels = torch.where(torch.arange(16) < 8, wrong, y)  # the first 8 are misclassified
    for name in ("fgsm", "pgd", "apgd", "apgd-t", "square"):
        result = ATTACKS.get(name).from_options(eps=8 / 255, steps=3, queries=20)(model, x, labels)
        assert torch.equal(result.x_adv[:8], x[:8]), name
        assert not torch.equal(result.x_adv[8:], x[8:]), name
        if result.queries is not None:
            assert result.queries[:8].tolist() == [0] * 8


def _budget(cap: int | None) -> list[dict[str, object]]:
    return [
        {"name": "fgsm", "eps": "8/255"},
        {"name": "pgd", "eps": "8/255", "steps": 2, "step_size": "1/255"},
        {"name": "square", "eps": "8/255", "queries": 40, "samples": cap},
        {"name": "pgd", "eps": "4/255", "steps": 5},
    ]


def test_robust_accuracy_is_at_most_each_attacks_accuracy() -> None:
    model = trained_cnn()
    spec = InputSpec(3, 16, 16)
    data = [make_data(20, seed=s) for s in (6, 7)]
    cfg = _config(attacks=_budget(None), corruptions={"names": []})
    runners = {"torch": TorchRunner(model, spec), "engine": _engine(model, spec)}
    for ev in evaluate(model, runners, data, cfg, model_name="m", progress=False):
        by_eps = {round(r.eps * 255): r for r in ev.robust_accuracy}
        assert by_eps[8].attacks == ["fgsm", "pgd", "square"] and by_eps[8].samples == 40
        for attack in ev.attacks:
            assert by_eps[round(attack.eps * 255)].accuracy <= attack.accuracy, attack.name
        assert by_eps[4].attacks == ["pgd"] and by_eps[4].accuracy == ev.attacks[3].accuracy


def test_robust_accuracy_with_a_sample_cap_uses_the_images_every_attack_saw() -> None:
    model = trained_cnn()
    spec = InputSpec(3, 16, 16)
    data = [make_data(20, seed=s) for s in (6, 7)]
    cfg = _config(attacks=_budget(25), corruptions={"names": []})
    (ev,) = evaluate(model, {"torch": TorchRunner(model, spec)}, data, cfg, model_name="m", progress=False)
    robust8 = next(r for r in ev.robust_accuracy if round(r.eps * 255) == 8)
    assert robust8.samples == 25  # Square's cap: the first 25 images of the stream
    # The same per-image worst case, computed here attack by attack (each is seeded per call).
    x = torch.cat([b[0] for b in data])[:25]
    y = torch.cat([b[1] for b in data])[:25]
    survived = torch.ones(25, dtype=torch.bool)
    for options in _budget(25)[:3]:
        settings = {k: v for k, v in options.items() if k in ("steps", "queries")}
        step = {"step_size": 1 / 255} if "step_size" in options else {}
        attack = ATTACKS.get(str(options["name"])).from_options(eps=8 / 255, **settings, **step)
        parts = [attack(model, xb, yb).x_adv for xb, yb in ((x[:20], y[:20]), (x[20:], y[20:]))]
        with torch.no_grad():
            survived &= model(torch.cat(parts)).argmax(1) == y
    assert robust8.accuracy == int(survived.sum()) / 25


def test_black_box_flag_compares_like_with_like() -> None:
    model = trained_cnn()
    spec = InputSpec(3, 16, 16)
    data = [make_data(40, seed=8)]
    # A weak white-box attack at 1/255 and a strong black-box one at 16/255: different
    # budgets, nothing to compare, no flag (the old rule compared their minima and fired).
    cfg = _config(
        attacks=[
            {"name": "pgd", "eps": "1/255", "steps": 5},
            {"name": "square", "eps": "16/255", "queries": 200},
        ],
        corruptions={"names": []},
    )
    (ev,) = evaluate(model, {"torch": TorchRunner(model, spec)}, data, cfg, model_name="m", progress=False)
    pgd, square = ev.attacks
    assert square.accuracy < pgd.accuracy - 0.3, (pgd.accuracy, square.accuracy)
    assert "black-box-stronger-than-white-box" not in ev.flags
    # Same budget on a model that masks its gradients: the flag fires.
    masked = Quantised(model).eval()
    cfg = _config(
        attacks=[
            {"name": "pgd", "eps": "16/255", "steps": 5},
            {"name": "square", "eps": "16/255", "queries": 200},
        ],
        corruptions={"names": []},
    )
    (ev,) = evaluate(masked, {"torch": TorchRunner(masked, spec)}, data, cfg, model_name="m", progress=False)
    assert "black-box-stronger-than-white-box" in ev.flags


class _NanRows(nn.Module):
    """The model's logits, with the first two images' logits NaN (a broken engine)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).clone()
        out[:2, 1:] = float("nan")
        return out


def test_nan_logits_fail_parity_and_the_intrinsic_gates() -> None:
    model = trained_cnn()
    spec = InputSpec(3, 16, 16)
    data = [make_data(10, seed=9)]
    runners = {"torch": TorchRunner(model, spec), "onnxruntime": _engine(_NanRows(model), spec)}
    cfg = _config(attacks=[{"name": "pgd", "eps": "4/255", "steps": 2}], corruptions={"names": []})
    evs = evaluate(model, runners, data, cfg, model_name="pruned", progress=False)
    engine = next(e for e in evs if e.runtime == "onnxruntime")
    assert engine.parity is not None
    assert engine.parity.max_abs_diff is None  # never silently 0
    assert engine.parity.nonfinite == 2 and engine.parity.top1_agreement == pytest.approx(0.8)
    assert engine.nonfinite_logits == 4  # two images, clean and attacked
    assert engine.clean_accuracy <= 0.8  # a NaN row is never correct
    assert "engine-disagrees-with-torch" in engine.flags
    checks = {g.name: g for g in intrinsic_gates(Report(evaluations=evs))}
    assert not checks["engine-parity"].passed and not checks["finite-logits"].passed
    assert "2 NaN/Inf images" in checks["engine-parity"].detail


def test_robust_accuracy_of_a_bare_engine_records_what_it_misses_and_its_gate_fails() -> None:
    from toolchain.report.gates import evaluate_gates

    model = _model()
    spec = InputSpec(3, 16, 16)
    cfg = _config(corruptions={"names": []})  # pgd (white-box) and square at 4/255
    (ev,) = evaluate(
        None, {"engine": _engine(model, spec)}, [make_data(12, seed=1)], cfg, model_name="m", progress=False
    )
    (robust,) = ev.robust_accuracy
    assert robust.attacks == ["square"] and robust.missing == ["pgd"]  # pgd needs the PyTorch model
    report = Report(evaluations=[ev])
    where = "evaluations[model=m].robust_accuracy[norm=linf]"
    worst, subset = evaluate_gates(
        report,
        [
            {"metric": f"{where}.accuracy", "threshold": 0.0},  # the recipe's worst case: not measured
            {"metric": f"{where[:-1]},attacks=square].accuracy", "threshold": 0.0},  # names the subset
        ],
    )
    assert not worst.passed and "pgd" in (worst.error or "") and "attacks=square" in (worst.error or "")
    assert subset.passed and subset.value == robust.accuracy
