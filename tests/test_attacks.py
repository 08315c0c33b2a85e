"""Attacks: every registered attack on a small CNN trained here on a synthetic task.

The task: 4 classes, a bright square in one quadrant (the class) on a noisy background. A few
seconds of training give ~100% clean accuracy and a model that is not robust, so attacks have
something to break and every check below can fail.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from exporters.base import Runner
from tests.conftest import one_torch_thread
from toolchain.errors import UnknownNameError, UserError
from toolchain.robustness.attacks import (
    APGD,
    ATTACKS,
    PGD,
    Square,
    build_attack,
    parse_eps,
    robust_accuracy,
    transfer_attack,
)
from toolchain.robustness.attacks.apgd import checkpoint_intervals
from toolchain.robustness.attacks.square import p_schedule

SIZE, CLASSES = 16, 4
EPS = 8 / 255


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy background with a brighter 6x6 square in quadrant ``y``; the contrast varies per
    sample, so margins (and the eps that breaks each sample) are spread out."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = 0.3 + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    contrast = 0.04 + 0.16 * torch.rand(n, generator=g)
    for i, label in enumerate(y.tolist()):
        top, left = 8 * (label // 2) + 1, 8 * (label % 2) + 1
        x[i, :, top : top + 6, left : left + 6] += contrast[i]
    return x.clamp(0, 1), y


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, CLASSES),
    )


@functools.lru_cache(maxsize=1)
def trained_cnn() -> nn.Module:
    """Train once per session (shared with test_sanity.py): under a second on one thread."""
    with one_torch_thread():
        torch.manual_seed(0)
        model = make_cnn()
        x, y = make_data(512, seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(8):
            for xb, yb in zip(x.split(64), y.split(64)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def model() -> nn.Module:
    return trained_cnn()


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(64, seed=2)


def _attack(name: str, eps: float, **kw: object) -> object:
    options = {"steps": 10, "queries": 100, "seed": 0} | kw
    return build_attack(name, eps=eps, **options)  # type: ignore[arg-type]


def test_trained_model_is_accurate(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert robust_accuracy(model, *batch) >= 0.95


def test_registry_and_build_errors() -> None:
    assert {"fgsm", "pgd", "apgd", "square"} <= set(ATTACKS.names())
    with pytest.raises(
        UnknownNameError, match="known: apgd, apgd-t, autoattack, autoattack-lite, fgsm, pgd, segpgd, square"
    ):
        build_attack("cw", eps=EPS, steps=10)
    with pytest.raises(UserError, match="supports norm linf"):
        build_attack("square", eps=EPS, norm="l2", steps=0)
    with pytest.raises(UserError, match="supports norm linf"):
        build_attack("fgsm", eps=EPS, norm="l2", steps=1)
    with pytest.raises(UserError, match=">= 0"):
        build_attack("pgd", eps=-0.1, steps=10)
    with pytest.raises(UserError, match="queries"):
        build_attack("square", eps=EPS, steps=0, queries=0)


def test_parse_eps() -> None:
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 0.03 ") == pytest.approx(0.03)
    assert parse_eps(1) == 1.0
    assert build_attack("pgd", eps="4/255", steps=5).eps == pytest.approx(4 / 255)
    for bad in ("eight", "1/0", "-0.1", "nan"):
        with pytest.raises(UserError, match="eps"):
            parse_eps(bad)


def test_default_pgd_step_size() -> None:
    attack = build_attack("pgd", eps=EPS, steps=10)
    assert isinstance(attack, PGD) and attack.step_size == pytest.approx(2.5 * EPS / 10)
    assert build_attack("pgd", eps=EPS, steps=10, step_size=0.01).step_size == 0.01


HAS_REFERENCE = importlib.util.find_spec("pyautoattack") is not None
ALL_ATTACKS = [
    pytest.param(n, marks=pytest.mark.skipif(not HAS_REFERENCE, reason="pyautoattack not installed"))
    if n == "autoattack"
    else n
    for n in ATTACKS.names()
]


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_eps_zero_is_clean(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    result = _attack(name, 0.0)(model, x, y)
    assert torch.equal(result.x_adv, x)
    assert robust_accuracy(model, result.x_adv, y) == robust_accuracy(model, x, y)
    if result.queries is not None:
        assert int(result.queries.sum()) == 0


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd", "apgd-t", "square"])
def test_accuracy_falls_as_eps_grows(
    name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    clean = robust_accuracy(model, x, y)
    options = {}
    if name == "square":  # the slowest attack: a smaller batch, a budget that does some harm
        x, y, options = x[:32], y[:32], {"queries": 400}
    accs = [
        robust_accuracy(model, _attack(name, e, **options)(model, x, y).x_adv, y)
        for e in (2 / 255, EPS, 16 / 255)
    ]
    # Non-increasing, allowing one sample of slack for FGSM's single overshooting step.
    slack = 1 / len(y) + 1e-9 if name == "fgsm" else 1e-9
    assert all(b <= a + slack for a, b in zip([clean, *accs], accs)), accs
    # Measured: 0.16-0.19 for the gradient attacks, 0.25 for Square.
    assert accs[-1] <= 0.75 * clean, f"{name} barely hurts an undefended model: {accs}"


@pytest.mark.parametrize(
    ("name", "norm", "eps"),
    [
        ("fgsm", "linf", EPS),
        ("pgd", "linf", EPS),
        ("pgd", "l2", 0.5),
        ("apgd", "linf", EPS),
        ("apgd", "l2", 0.5),
        ("apgd-t", "linf", EPS),
        ("apgd-t", "l2", 0.5),
        ("autoattack-lite", "linf", EPS),
        ("square", "linf", EPS),
    ],
)
def test_stays_in_ball_and_range(
    name: str, norm: str, eps: float, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    x_adv = _attack(name, eps, norm=norm)(model, x, y).x_adv
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(size.max()) > 0.5 * eps  # it did move


def test_apgd_at_least_as_strong_as_pgd(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    eps, steps = 3 / 255, 10
    wins = 0
    for seed in range(3):
        pgd = robust_accuracy(model, PGD(eps=eps, steps=steps, seed=seed)(model, x, y).x_adv, y)
        apgd = robust_accuracy(model, APGD(eps=eps, steps=steps, seed=seed)(model, x, y).x_adv, y)
        wins += apgd <= pgd
    assert wins >= 2


def test_apgd_checkpoints_and_square_schedule() -> None:
    assert checkpoint_intervals(100) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert p_schedule(0, 10_000) == 0.8 and p_schedule(11, 10_000) == 0.4
    assert p_schedule(9_000, 10_000) == pytest.approx(0.8 / 512)
    # Rescaled for a 1,000-query budget: iteration 100 is iteration 1,000 of 10,000.
    assert p_schedule(100, 1_000) == pytest.approx(0.8 / 16)
    assert p_schedule(101, 1_000) == pytest.approx(0.8 / 32)


def test_white_box_attack_rejects_a_runner(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    with pytest.raises(UserError, match="white-box"):
        _attack("pgd", EPS)(lambda t: torch.zeros(len(t), CLASSES), x, y)


def test_attack_rejects_normalised_pixels(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        _attack("pgd", EPS)(model, x * 2 - 1, y)


class _CountingClassifier:
    """Logits callable that records every batch size it is queried with."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        with torch.no_grad():
            return self.model(x)


def test_square_counts_queries(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    x, y = x[:32], y[:32].clone()
    y[:4] = (y[:4] + 1) % CLASSES  # four samples misclassified from the start
    budget = 60
    counter = _CountingClassifier(model)
    result = Square(eps=EPS, queries=budget, seed=0)(counter, x, y)
    q = result.queries
    assert q is not None and q.dtype == torch.long and len(q) == len(y)
    assert int(q.max()) <= budget
    assert q[:4].tolist() == [0, 0, 0, 0]  # misclassified at the start: not attacked
    assert bool((q[4:] >= 1).all())
    # Counted queries are exactly the rows sent after the clean call, one call per iteration.
    assert counter.calls[0] == len(y) and sum(counter.calls[1:]) == int(q.sum())
    assert len(counter.calls) <= budget + 1
    still_correct = (model(result.x_adv).argmax(1) == y).detach()
    assert bool((q[still_correct] == budget).all())  # robust samples used the whole budget
    assert result.mean_queries == pytest.approx(float(q.float().mean()))


def test_square_is_seeded(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    a = Square(eps=EPS, queries=50, seed=3)(model, x, y)
    b = Square(eps=EPS, queries=50, seed=3)(model, x, y)
    c = Square(eps=EPS, queries=50, seed=4)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert not torch.equal(a.x_adv, c.x_adv)


def onnx_runner(model: nn.Module, path: Path) -> Runner:
    from exporters.ort_runner import OnnxRuntimeRunner

    with warnings.catch_warnings():  # the legacy exporter is deprecated, and asked for
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.rand(1, 3, SIZE, SIZE),),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return OnnxRuntimeRunner(path, threads=1)  # one thread: see tests/conftest.py::one_torch_thread


def test_square_same_on_torch_and_onnxruntime(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, y = batch
    runner = onnx_runner(model, tmp_path / "cnn.onnx")
    on_torch = Square(eps=EPS, queries=150, seed=7)(model, x, y)
    on_ort = Square(eps=EPS, queries=150, seed=7)(runner, x, y)
    assert robust_accuracy(runner, on_ort.x_adv, y) == robust_accuracy(model, on_torch.x_adv, y)
    # Same seed, same path per image, except where a candidate's margin change is within float32
    # rounding of the two runtimes (a near-tie); those are rare, never the majority.
    same_image = (on_torch.x_adv == on_ort.x_adv).flatten(1).all(dim=1)
    assert same_image.float().mean() >= 0.95
    assert (on_torch.queries == on_ort.queries).float().mean() >= 0.95
    assert robust_accuracy(runner, on_ort.x_adv, y) < robust_accuracy(runner, x, y)


def test_transfer_replays_white_box_examples(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, y = batch
    runner = onnx_runner(model, tmp_path / "cnn.onnx")
    result = transfer_attack(_attack("pgd", EPS), model, {"onnxruntime": runner}, x, y)
    # The same model in fp32: its examples transfer exactly.
    assert result.accuracy["onnxruntime"] == pytest.approx(result.white_box_accuracy)
    assert result.white_box_accuracy < robust_accuracy(model, x, y)
    with pytest.raises(UserError, match="white-box"):
        transfer_attack(_attack("square", EPS), model, {"onnxruntime": runner}, x, y)
