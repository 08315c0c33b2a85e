"""Sanity flags: each fires on a model built to show the problem, and stays quiet on a healthy one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_attacks import EPS, make_data, trained_cnn
from toolchain.errors import UserError
from toolchain.robustness import sanity
from toolchain.robustness.attacks import PGD, Square


class Softmaxed(nn.Module):
    """Returns probabilities instead of logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).softmax(1)


class Quantised(nn.Module):
    """Rounds the input to 4 levels first: gradient exactly zero, decisions still movable."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


class DropoutAlwaysOn(nn.Module):
    """Dropout forced on even in eval mode (``training=True``): a randomised defence."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(F.dropout(x, p=0.2, training=True))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained_cnn()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(64, seed=2)


def test_every_flag_is_documented() -> None:
    names = {
        sanity.PROBABILITIES,
        sanity.ZERO_GRADIENTS,
        sanity.RANDOMISED,
        sanity.BLACK_BOX_STRONGER,
        sanity.TRANSFER_STRONGER,
        sanity.ENGINE_DISAGREES,
    }
    assert names == set(sanity.FLAGS)
    assert all(desc and "\n" not in desc for desc in sanity.FLAGS.values())


def test_healthy_model_raises_no_flag(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    assert sanity.output_flags(model, x) == []
    assert sanity.check_zero_gradients(model, x, y) is None
    assert sanity.check_zero_gradients(None, x, y) is None  # a bare engine: nothing to check


def test_probabilities_not_logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    assert sanity.check_probabilities(Softmaxed(model)(x)) == "probabilities-not-logits"
    assert sanity.output_flags(Softmaxed(model), x) == ["probabilities-not-logits"]
    # In [0, 1] but rows not summing to one (e.g. sigmoid outputs): not softmax.
    assert sanity.check_probabilities(torch.full((4, 3), 0.5)) is None
    assert sanity.check_probabilities(model(x)) is None


def test_zero_gradients_on_quantised_input(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    masked = Quantised(model)
    assert sanity.check_zero_gradients(masked, x, y) == "zero-gradients"
    # The threshold is a share of the batch: all-zero on half the samples still fires, on a
    # few percent it does not.
    assert sanity.check_zero_gradients(_HalfMasked(model, 32), x, y) == "zero-gradients"
    assert sanity.check_zero_gradients(_HalfMasked(model, 2), x, y) is None
    assert sanity.check_zero_gradients(_HalfMasked(model, 2), x, y, min_share=0.01) == "zero-gradients"


class _HalfMasked(nn.Module):
    """Cuts the gradient of the first ``k`` samples only."""

    def __init__(self, inner: nn.Module, k: int) -> None:
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([x[: self.k].detach(), x[self.k :]]))


def test_masked_gradients_are_caught_by_black_box_vs_white_box(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """End to end: PGD is blind on the quantised model, Square is not, and the flag says so."""
    x, y = batch
    x, y = x[:32], y[:32]
    masked = Quantised(model)
    eps = 16 / 255
    white = _survivors(masked, PGD(eps=eps, steps=10)(masked, x, y).x_adv, y)
    black = _survivors(masked, Square(eps=eps, queries=300)(masked, x, y).x_adv, y)
    assert black.float().mean() < white.float().mean() - 0.1, (white.float().mean(), black.float().mean())
    assert sanity.check_black_box_stronger(white, black) == "black-box-stronger-than-white-box"
    # On the healthy model, PGD is at least as strong as Square: no flag.
    white = _survivors(model, PGD(eps=EPS, steps=10)(model, x, y).x_adv, y)
    black = _survivors(model, Square(eps=EPS, queries=100)(model, x, y).x_adv, y)
    assert sanity.check_black_box_stronger(white, black) is None


def _survivors(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def test_randomised_outputs(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    noisy = DropoutAlwaysOn(model).eval()
    assert sanity.check_randomised_outputs(noisy, x) == "randomised-outputs"
    assert "randomised-outputs" in sanity.output_flags(noisy, x)
    assert sanity.check_randomised_outputs(model, x) is None
    # A difference inside the tolerance (GPU-reduction noise) is not randomness.
    logits = model(x).detach()
    assert sanity.check_randomised_outputs(model, x, reference=logits + 1e-6) is None
    assert sanity.check_randomised_outputs(model, x, reference=logits + 0.1) == "randomised-outputs"


def _outcomes(robust: int, n: int = 100) -> torch.Tensor:
    """The first ``robust`` of ``n`` images survived."""
    return torch.arange(n) < robust


@pytest.mark.parametrize(
    ("white_robust", "black_robust", "expected"),
    [
        # Same 100 images; black-box fools images 30..49 on top of white-box's: 20 > 2 * sqrt(20).
        (50, 30, "black-box-stronger-than-white-box"),
        # 5 more images fooled, none the other way: 5 > 2 * sqrt(5) = 4.47.
        (50, 45, "black-box-stronger-than-white-box"),
        # 4 more: 4 > 2 * sqrt(4) = 4 is false; within two standard errors of noise.
        (50, 46, None),
        (30, 50, None),  # the usual case: white-box is stronger
        (30, 30, None),
    ],
)
def test_black_box_stronger_is_a_paired_test(
    white_robust: int, black_robust: int, expected: str | None
) -> None:
    white, black = _outcomes(white_robust), _outcomes(black_robust)
    assert sanity.check_black_box_stronger(white, black) == expected


def test_paired_test_counts_disagreements_both_ways() -> None:
    # Black-box is 6 points lower (34% vs 40%), but the two disagree on 34 images both ways:
    # white-box survivors are images 0..39, black-box survivors 20..53.
    white = torch.zeros(100, dtype=torch.bool)
    black = torch.zeros(100, dtype=torch.bool)
    white[:40], black[20:54] = True, True
    excess, se = sanity.paired_difference(white, black)
    only_black = int((white & ~black).sum())  # images 0..19: fooled by the black-box attack only
    only_white = int((~white & black).sum())  # images 40..53: fooled by white-box only
    assert (only_black, only_white) == (20, 14)
    assert excess == 6 and se == pytest.approx(34**0.5)
    assert sanity.check_black_box_stronger(white, black) is None  # 6 < 2 * 5.83
    assert sanity.check_black_box_stronger(white, black, z=1.0) == "black-box-stronger-than-white-box"
    with pytest.raises(ValueError, match="same images"):
        sanity.paired_difference(white, black[:50])


def test_transfer_stronger_logic() -> None:
    assert sanity.check_transfer_stronger(_outcomes(60), _outcomes(40)) == "transfer-stronger-than-white-box"
    assert sanity.check_transfer_stronger(_outcomes(40), _outcomes(60)) is None
    assert sanity.check_transfer_stronger(_outcomes(40), _outcomes(39)) is None


@pytest.mark.parametrize(
    ("agreement", "precision", "expected"),
    [
        (1.0, "fp32", None),
        (0.998, "fp32", "engine-disagrees-with-torch"),  # one flip in 500 is one too many
        (0.995, "fp16", None),
        (0.98, "fp16", "engine-disagrees-with-torch"),
        (0.99, "int8", None),
        (0.95, "int8", "engine-disagrees-with-torch"),
    ],
)
def test_engine_agreement(agreement: float, precision: str, expected: str | None) -> None:
    assert sanity.check_engine_agreement(agreement, precision) == expected


def test_engine_agreement_thresholds_are_parameters() -> None:
    assert sanity.check_engine_agreement(0.95, "int8", {"int8": 0.9}) is None
    with pytest.raises(UserError, match="precision 'bf16'"):
        sanity.check_engine_agreement(1.0, "bf16")
