"""AutoAttack-grade pieces: APGD's step-size schedule, APGD-T's loss, Square's acceptance rule,
the autoattack-lite ensemble, and the optional adapter to the reference code."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from tests.test_attacks import EPS, make_data, trained_cnn
from toolchain.errors import UserError
from toolchain.robustness.attacks import APGD, APGDT, AutoAttackLite, Square, build_attack, robust_accuracy
from toolchain.robustness.attacks.apgd import StepSizeSchedule
from toolchain.robustness.attacks.apgd_t import dlr_targeted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained_cnn()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(32, seed=5)


def _rising_without_record(steps: int) -> list[float]:
    """Rises by 0.01 on all but every 11th step, where it drops by 0.5: mostly increasing, yet
    never above 3, far below the starting best loss of 10."""
    values, value = [], 1.0
    for i in range(steps):
        value = value - 0.5 if i % 11 == 10 else value + 0.01
        values.append(value)
    return values


def test_apgd_halving_follows_the_reference_schedule_on_crafted_losses() -> None:
    """fra31/auto-attack: checkpoints after 22, then 19 more iterations (of 100); halve when
    at most 75% of the steps since the last checkpoint increased the loss, or when the step was
    not halved last time and the best loss did not improve, where "last time" starts as
    "halved" (reduced_last_check = 1), so the second rule is off at the first checkpoint."""
    steps = 100
    start_best = torch.tensor([10.0, 1.0, 0.0])
    # Sample 0: rising on 20 of 22 steps, but no new best. Sample 1: flat. Sample 2: new best
    # at every step.
    rising = _rising_without_record(41)
    schedule = StepSizeSchedule(3, steps, start_best)
    loss_best = start_best.clone()
    decisions = {}
    for i in range(41):
        loss = torch.tensor([rising[i], 1.0, 0.1 * (i + 1)])
        loss_best = torch.maximum(loss_best, loss)
        halve = schedule.observe(loss, loss_best)
        if halve is not None:
            decisions[i + 1] = halve.tolist()
    assert list(decisions) == [22, 41]  # the checkpoints: 22, then 22 + 19
    # First checkpoint: sample 0 rose on 20 > 16.5 steps; its best did not improve, but the
    # second rule is off, so it keeps its step. Flat sample 1 rose once (its first loss is
    # compared with 0, as in the reference's zero-initialised history) and is halved.
    assert decisions[22] == [False, True, False]
    # Second checkpoint: sample 0 rose on 17 > 14.25 of 19 steps, but it was not halved last
    # time and its best is still 10: halved now. Sample 1, halved last time, is halved again
    # by the first rule only (0 increases).
    assert decisions[41] == [True, True, False]


def test_dlr_targeted_loss_by_hand() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 2.0, 3.0]])
    y = torch.tensor([0, 2])
    target = torch.tensor([1, 4])
    # Row 0: -(4 - 3) / (4 - (2 + 1) / 2) = -0.4. Row 1: -(5 - 3) / (5 - (2 + 1) / 2) = -4/7.
    loss = dlr_targeted(target)(logits, y)
    assert loss.tolist() == pytest.approx([-0.4, -4 / 7])
    # Shift- and scale-invariant: inflating the logits does not weaken the attack.
    assert dlr_targeted(target)(3 * logits + 7, y).tolist() == pytest.approx(loss.tolist())


def test_apgd_t_needs_four_classes(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    three = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    with torch.no_grad():
        y = three(x).argmax(1)  # all correctly classified, so the attack runs
    with pytest.raises(UserError, match="at least 4 classes"):
        APGDT(eps=EPS, steps=2)(three, x, y)
    with pytest.raises(UserError, match="targets must be >= 1"):
        APGDT(eps=EPS, targets=0)


def test_apgd_t_reaches_images_apgd_ce_cannot_on_an_inflated_model(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Logits scaled by 1e4 saturate the softmax: the cross-entropy's gradient underflows to
    zero for confidently classified images, so APGD-CE is blind; the DLR loss is scale-free."""
    x, y = batch
    inflated = nn.Sequential(model, _Scale(1e4)).eval()
    eps = 16 / 255
    ce = robust_accuracy(inflated, APGD(eps=eps, steps=20)(inflated, x, y).x_adv, y)
    targeted = robust_accuracy(inflated, APGDT(eps=eps, steps=20, targets=3)(inflated, x, y).x_adv, y)
    assert targeted < ce - 0.3, (ce, targeted)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.factor


class _TinyMarginClassifier:
    """Two classes, label 0, margin ``1 - 0.001 * mean(x)`` on logits near 100: brightening
    any window lowers the margin by at most ~2e-4, far below 1e-5 * max|logit| = 1e-3."""

    def __init__(self) -> None:
        self.margins: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        margin = 1.0 - 0.001 * x.flatten(1).mean(1)
        logits = torch.stack([torch.full_like(margin, 100.0), 100.0 - margin], dim=1)
        self.margins.append(logits[:, 0] - logits[:, 1])
        return logits


def test_square_accepts_any_margin_decrease() -> None:
    x = torch.full((2, 1, 8, 8), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    clf = _TinyMarginClassifier()
    result = Square(eps=0.1, queries=50, seed=0)(clf, x, y)
    # clf.margins: [clean, stripes, candidates...]; the search must have improved on the stripes.
    stripes = clf.margins[1]
    final = 1.0 - 0.001 * result.x_adv.flatten(1).mean(1)
    assert bool((final < stripes - 1e-5).all()), (stripes, final)


def test_autoattack_lite_is_the_worst_case_of_its_parts(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    eps = 4 / 255
    lite = build_attack("autoattack-lite", eps=eps, steps=10, targets=3, queries=60)
    assert isinstance(lite, AutoAttackLite)
    assert [p.name for p in lite.components()] == ["apgd", "apgd-t", "square"]
    assert [p.steps for p in lite.components()[:2]] == [10, 10]
    ensemble = robust_accuracy(model, lite(model, x, y).x_adv, y)
    parts = [robust_accuracy(model, part(model, x, y).x_adv, y) for part in lite.components()]
    assert ensemble <= min(parts), (ensemble, parts)
    assert ensemble < robust_accuracy(model, x, y)


def test_autoattack_lite_standard_settings() -> None:
    lite = build_attack("autoattack-lite", eps=EPS)
    apgd, apgd_t, square = lite.components()
    assert (apgd.steps, apgd.restarts) == (100, 1)  # type: ignore[attr-defined]
    assert (apgd_t.steps, apgd_t.targets, apgd_t.restarts) == (100, 9, 1)  # type: ignore[attr-defined]
    assert isinstance(square, Square)
    assert (square.queries, square.p_init, square.rescale_schedule) == (5000, 0.8, False)
    # L2: our Square is L-inf only, so the ensemble is APGD-CE + APGD-T.
    assert [p.name for p in build_attack("autoattack-lite", eps=0.5, norm="l2").components()] == [
        "apgd",
        "apgd-t",
    ]


def test_reference_adapter_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "pyautoattack" else real(n, *a)
    )
    with pytest.raises(UserError, match=r"pip install -e '\.\[autoattack\]'"):
        build_attack("autoattack", eps=EPS)


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="pyautoattack not installed")
def test_reference_autoattack_runs_through_the_adapter(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    x, y = x[:12], y[:12]
    eps = 8 / 255
    reference = build_attack("autoattack", eps=eps, seed=0)
    assert reference.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]  # type: ignore[attr-defined]
    # The white-box half of the standard run (Square's 5,000 queries are the benchmark's job).
    # With 4 classes the adapter caps the reference's 9 target classes at 3 (the reference
    # would index past the logits).
    reference.attacks = ["apgd-ce", "apgd-t"]  # type: ignore[attr-defined]
    x_adv = reference(model, x, y).x_adv
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    theirs = robust_accuracy(model, x_adv, y)
    ours = robust_accuracy(model, AutoAttackLite(eps=eps, queries=1)(model, x, y).x_adv, y)
    assert theirs < robust_accuracy(model, x, y)
    assert abs(theirs - ours) <= 1 / 12 + 1e-9, (theirs, ours)  # measured: equal (5 of 12 robust)
    with pytest.raises(UserError, match="unknown parts"):
        type(reference)(eps=eps, attacks=["fab-x"])  # type: ignore[call-arg]


class _Recorder(nn.Module):
    """Wraps a model and records every batch it is called on (APGD's iterates)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []  # type: list[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_apgd_keeps_the_last_fooling_iterate_as_the_reference_does(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Hole 12: the first fooling point sits on the decision boundary and transfers worst; the
    reference keeps updating its result while the model stays fooled. (Failed before: the
    result was the first fooling iterate.)"""
    x, y = batch
    recorder = _Recorder(model).eval()
    checked = 0
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        recorder.seen.clear()
        result = APGD(eps=EPS, steps=20, seed=0)(recorder, xi, yi).x_adv
        with torch.no_grad():
            fooled = [bool(model(it).argmax(1) != yi) for it in recorder.seen]
        if fooled.count(True) < 2 or (not fooled[-1] and fooled.index(True) == len(fooled) - 1):
            continue
        iterates = [it for it, f in zip(recorder.seen, fooled, strict=True) if f]
        if torch.equal(iterates[0], iterates[-1]):
            continue
        assert torch.equal(result, iterates[-1])
        checked += 1
    assert checked >= 3, "too few images fooled more than once to check"


def test_apgd_l2_random_start_lies_on_the_sphere() -> None:
    """Hole 12: the reference starts L2 APGD at distance eps; ours drew a uniform radius."""
    x = torch.full((6, 3, 8, 8), 0.5)
    recorder = _Recorder(nn.Sequential(nn.Flatten(), nn.Linear(192, 4))).eval()
    with torch.no_grad():
        y = recorder.inner(x).argmax(1)
    APGD(eps=0.5, norm="l2", steps=1, seed=3)(recorder, x, y)
    start = recorder.seen[1]  # [0] is the clean check of which images to attack
    radius = (start - x).flatten(1).norm(dim=1)
    assert torch.allclose(radius, torch.full((6,), 0.5), atol=1e-5), radius


def test_never_fooled_images_keep_their_best_point_across_restarts_and_targets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hole 12: an image no restart (and no APGD-T target) fools keeps the highest-loss point of
    all of them, not whatever the last restart returned. (Failed before: the last one won.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x = torch.rand(2, 3, 2, 2)
    y = net(x).argmax(1)
    runs: list[torch.Tensor] = []

    def fake_once(self, model, xs, ys, loss_fn, generator, *, highest_loss=False):  # type: ignore[no-untyped-def]
        point = (xs + 0.01 * torch.randn_like(xs)).clamp(0, 1)
        runs.append(point)
        return point, torch.zeros(len(xs), dtype=torch.bool)

    monkeypatch.setattr(APGD, "_attack_once", fake_once)
    for attack in (APGD(eps=EPS, steps=5, restarts=4), APGDT(eps=EPS, steps=5, targets=3, restarts=2)):
        runs.clear()
        result = attack(net, x, y).x_adv
        with torch.no_grad():
            losses = torch.stack([nn.functional.cross_entropy(net(r), y, reduction="none") for r in runs])
        assert len(runs) == (4 if attack.name == "apgd" else 6)
        best = losses.argmax(0)
        expected = torch.stack([runs[int(best[i])][i] for i in range(len(x))])
        assert torch.equal(result, expected)


def test_autoattack_lite_honours_restarts_and_other_attacks_refuse_them() -> None:
    """Hole 12: `restarts` was silently dropped for autoattack-lite (and for Square/FGSM)."""
    apgd, apgd_t, _ = build_attack("autoattack-lite", eps=EPS, restarts=3).components()
    assert (apgd.restarts, apgd_t.restarts) == (3, 3)  # type: ignore[attr-defined]
    for name in ("square", "fgsm"):
        with pytest.raises(UserError, match=f"attack '{name}' has no restarts"):
            build_attack(name, eps=EPS, restarts=2)
    assert build_attack("square", eps=EPS, restarts=1).name == "square"
