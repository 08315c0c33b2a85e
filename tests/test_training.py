"""The training loop's hooks, schedules and losses (hybrid, mixed noise)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from toolchain.recipe import MixedNoiseConfig, TrainConfig, recipe_from_dict
from toolchain.training import Step, TrainHooks, train_model
from toolchain.training.losses import BatchLoss
from toolchain.training.mixed import KINDS, MixedNoise, split_counts
from toolchain.training.schedule import lr_factor, momentum_at

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )


def batches(n: int = 4, size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.rand(8, 3, size, size, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)
    ]


def test_split_counts_follow_the_proportions_and_fill_the_batch() -> None:
    cfg = MixedNoiseConfig(clean=0.4, fgsm=0.1, pgd=0.2, corruption=0.2, generator=0.1)
    counts = split_counts(20, cfg)
    assert counts == {"clean": 8, "fgsm": 2, "pgd": 4, "corruption": 4, "generator": 2}
    odd = split_counts(7, cfg)
    assert sum(odd.values()) == 7 and all(abs(odd[k] - getattr(cfg, k) * 7) < 1 for k in KINDS)


def test_mixed_batch_holds_each_kind_in_proportion_and_within_budget() -> None:
    cfg = MixedNoiseConfig(
        clean=0.25, fgsm=0.25, pgd=0.25, corruption=0.125, generator=0.125, corruptions=["fog"]
    )
    attack = TrainConfig().attack.model_copy(update={"eps": 8 / 255, "steps": 2})
    mixer = MixedNoise(cfg, attack)
    model = tiny_net().train()
    x, y = torch.rand(16, 3, 12, 12), torch.randint(0, 4, (16,))
    batch = mixer.compose(model, x, y, torch.Generator().manual_seed(0))
    counts = {kind: int((batch.kinds == i).sum()) for i, kind in enumerate(KINDS)}
    assert counts == {"clean": 4, "fgsm": 4, "pgd": 4, "corruption": 2, "generator": 2}
    assert model.training  # restored after crafting in eval mode
    delta = (batch.x - x).flatten(1).abs().amax(1)
    for i, kind in enumerate(KINDS):
        rows = delta[batch.kinds == i]
        if kind == "clean":
            assert torch.all(rows == 0)
        elif kind == "corruption":
            assert torch.all(rows > 0.01)  # fog is not an L-inf ball
        elif kind != "generator":  # the generator starts at zero: its first step barely moves
            assert torch.all(rows > 0) and torch.all(rows <= 8 / 255 + 1e-6)
    assert torch.all(delta[batch.kinds == KINDS.index("generator")] <= 8 / 255 + 1e-6)
    assert mixer.generator is not None and any(
        p.abs().sum() > 0 for p in mixer.generator.net[-1].parameters()
    )


def test_mixed_config_rejects_bad_proportions() -> None:
    with pytest.raises(ValueError, match="must sum to 1"):
        MixedNoiseConfig(clean=0.5, pgd=0.25, corruption=0.25, generator=0.25)


def test_hybrid_loss_weights_clean_and_adversarial_cross_entropy() -> None:
    model = tiny_net().eval()
    x, y = batches(1)[0]
    cfg = TrainConfig(loss="hybrid", adv_weight=0.25)
    adv = x.flip(0)  # any fixed "perturbation" makes the two halves distinguishable
    loss, logits = BatchLoss(cfg, perturb=lambda m, a, b: adv)(
        model, x, y, adversarial=True, generator=torch.Generator()
    )
    ce = nn.functional.cross_entropy
    expected = 0.75 * ce(model(x), y) + 0.25 * ce(model(adv), y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("loss", ["clean", "pgd", "trades", "hybrid", "mixed"])
def test_every_loss_trains(loss: str) -> None:
    cfg = recipe_from_dict(
        {"train": {"epochs": 1, "loss": loss, "attack": {"steps": 1}, "mixed": {"corruptions": ["rain"]}}}
    ).train
    history = train_model(tiny_net(), batches(), cfg, progress=False)
    assert (
        len(history) == 1
        and math.isfinite(history[0]["loss"])
        and history[0]["adversarial"] == (loss != "clean")
    )


def test_onecycle_and_warmup_schedules() -> None:
    one = TrainConfig(schedule="onecycle")
    assert lr_factor(one, 0, 100, 10) == pytest.approx(1 / 25)
    assert lr_factor(one, 29, 100, 10) == pytest.approx(1.0)  # torch's peak: step 0.3 * total - 1
    assert lr_factor(one, 99, 100, 10) < 1e-3
    warm = TrainConfig(schedule="cosine", lr_warmup_epochs=1)
    assert [round(lr_factor(warm, s, 100, 10), 3) for s in (0, 4, 9)] == [
        round(k / 11, 3) for k in (1, 5, 10)
    ]
    assert lr_factor(warm, 10, 100, 10) == pytest.approx(1.0)
    plain = TrainConfig(schedule="cosine")
    assert lr_factor(plain, 50, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("total", [7, 100, 313])
def test_onecycle_follows_torchs_onecyclelr_step_for_step(total: int) -> None:
    """lr and momentum at every step equal those torch's OneCycleLR (defaults: cosine, momentum
    cycled 0.95 -> 0.85 -> 0.95) gives a plain training script."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=total)
    cfg = TrainConfig(schedule="onecycle", lr=0.05, nesterov=True)
    for step in range(total):
        group = opt.param_groups[0]
        assert 0.05 * lr_factor(cfg, step, total, 10) == pytest.approx(group["lr"], rel=1e-9, abs=1e-15)
        assert momentum_at(cfg, step, total) == pytest.approx(group["momentum"], rel=1e-12)
        opt.step()
        sched.step()
    fixed = TrainConfig(schedule="onecycle", cycle_momentum=False, momentum=0.8)
    assert {momentum_at(fixed, s, total) for s in range(total)} == {0.8}
    assert momentum_at(TrainConfig(schedule="cosine"), 3, total) == 0.9


def test_the_loop_sets_sgds_momentum_from_the_schedule() -> None:
    seen: list[float] = []
    cfg = TrainConfig(epochs=2, loss="clean", schedule="onecycle")
    train_model(
        tiny_net(),
        batches(),
        cfg,
        progress=False,
        hooks=TrainHooks(after_step=lambda s: seen.append(s.optimizer.param_groups[0]["momentum"])),
    )
    assert seen == pytest.approx([momentum_at(cfg, step, 8) for step in range(8)])
    assert seen[0] == pytest.approx(0.95) and min(seen) < 0.9


def test_hooks_change_the_loop_without_copying_it() -> None:
    model = tiny_net()
    gate = torch.zeros(1, requires_grad=True)
    steps: list[int] = []
    frozen = list(model[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    before = [p.clone() for p in frozen]

    def groups(m: nn.Module) -> list[dict]:
        return [{"params": [p for p in m.parameters() if p.requires_grad], "lr": 0.5, "weight_decay": 0.0}]

    def extra(state: Step) -> torch.Tensor:
        return (gate - 1.0).pow(2).sum()

    seen_lrs: list[float] = []

    def after(state: Step) -> None:
        steps.append(state.step)
        seen_lrs.append(state.optimizer.param_groups[0]["lr"])

    hooks = TrainHooks(
        param_groups=groups,
        extra_loss=extra,
        after_step=after,
        metrics=lambda: {"gate": float(gate.detach())},
        side_optimizer=lambda: torch.optim.SGD([gate], lr=0.1),
    )
    cfg = TrainConfig(epochs=2, lr=0.01, loss="clean", schedule="constant")
    history = train_model(model, batches(), cfg, progress=False, hooks=hooks)
    assert steps == list(range(8)) and seen_lrs == [0.5] * 8  # the group's own lr, scheduled
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))  # frozen stayed frozen
    assert 0.0 < float(gate.detach()) < 1.0 and history[-1]["gate"] == pytest.approx(float(gate.detach()))


class Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Make the loop die at global step ``at_step`` (mid-epoch), as a kill would."""
    import toolchain.training.loops as loops

    real = loops.lr_factor

    def dying(cfg: TrainConfig, step: int, total: int, per_epoch: int) -> float:
        if step == at_step:
            raise Interrupt
        return real(cfg, step, total, per_epoch)

    monkeypatch.setattr(loops, "lr_factor", dying)


def _fresh(loss: str) -> tuple[nn.Module, object, TrainConfig]:
    from toolchain.training import make_loader

    data = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches(4))])
    cfg = recipe_from_dict(
        {"train": {"epochs": 3, "loss": loss, "attack": {"steps": 1}, "mixed": {"corruptions": ["rain"]}}}
    ).train
    return tiny_net(), make_loader(data, 8, shuffle=True, seed=5), cfg


@pytest.mark.parametrize("loss", ["pgd", "mixed"])
def test_interrupted_training_resumes_bit_for_bit(
    loss: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.training import TrainCheckpoint

    model, loader, cfg = _fresh(loss)
    reference = train_model(model, loader, cfg, seed=1, progress=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    checkpoint = TrainCheckpoint(tmp_path / "ckpt.pt", "key-1")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, at_step=6)  # epoch 2 of 3 (4 batches per epoch), half way
        model, loader, cfg = _fresh(loss)
        with pytest.raises(Interrupt):
            train_model(model, loader, cfg, seed=1, progress=False, checkpoint=checkpoint)
    assert checkpoint.path.is_file()
    model, loader, cfg = _fresh(loss)  # a new process: fresh model and loader
    resumed = train_model(model, loader, cfg, seed=1, progress=False, checkpoint=checkpoint)
    assert resumed == reference
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert not checkpoint.path.exists()  # removed once training completed


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_of_another_run_is_ignored(tmp_path: Path) -> None:
    from toolchain.training import TrainCheckpoint

    TrainCheckpoint(tmp_path / "c.pt", "old").save({"epoch": 2})
    assert TrainCheckpoint(tmp_path / "c.pt", "new").load() is None
    (tmp_path / "torn.pt").write_bytes(b"\x80\x04 not a checkpoint")
    assert TrainCheckpoint(tmp_path / "torn.pt", "new").load() is None


def _diverging() -> tuple[nn.Module, object, TrainConfig]:
    model, loader, cfg = _fresh("clean")
    return model, loader, cfg.model_copy(update={"lr": 1e6, "epochs": 3})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_diverging_training_is_the_users_setting_named_in_one_line(tmp_path: Path) -> None:
    from toolchain.errors import UserError
    from toolchain.training import TrainCheckpoint

    checkpoint = TrainCheckpoint(tmp_path / "ckpt.pt", "key-1")
    said = (
        r"^finetune: loss became NaN at epoch 2/3: lower finetune\.lr \(now 1e\+06\); the training diverged$"
    )
    for _attempt in range(2):  # the second resumes from the checkpoint, and stops the same way
        model, loader, cfg = _diverging()
        with pytest.raises(UserError, match=said):
            train_model(model, loader, cfg, progress=False, desc="finetune", checkpoint=checkpoint)
        saved = torch.load(checkpoint.path, weights_only=True)  # epoch 1 only: the NaN one is not saved
        assert saved["epoch"] == 1 and all(math.isfinite(h["loss"]) for h in saved["history"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_with_a_nan_history_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.training import TrainCheckpoint

    checkpoint = TrainCheckpoint(tmp_path / "ckpt.pt", "key-1")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, at_step=5)  # epoch 2 of 3: epoch 1 is saved
        model, loader, cfg = _fresh("clean")
        with pytest.raises(Interrupt):
            train_model(model, loader, cfg, progress=False, checkpoint=checkpoint)
    # As versions before the divergence check saved one: NaN weights, a NaN loss in the history.
    saved = torch.load(checkpoint.path, weights_only=True)
    saved["history"][0]["loss"] = math.nan
    saved["model"] = {
        k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in saved["model"].items()
    }
    checkpoint.save({k: v for k, v in saved.items() if k not in ("format", "key")})
    model, loader, cfg = _fresh("clean")
    history = train_model(model, loader, cfg, progress=False, checkpoint=checkpoint)
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)
