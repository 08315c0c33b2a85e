"""Models: the zoo on small inputs, Normalize, spec round-trips, checkpoints, torchvision, user factories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from tests import user_models
from toolchain.errors import CheckpointError, UnknownNameError, UserError
from toolchain.models import (
    MODELS,
    Normalize,
    NormalizedClassifier,
    build_from_spec,
    build_model,
    load_state_dict_file,
    model_spec,
)
from toolchain.models.base import scaled, zoo_task

ZOO = [arch for arch in MODELS.names() if zoo_task(arch) == "classification"]
GRAY = {"in_channels": 1, "mean": [0.3], "std": [0.35]}
RGB = {"in_channels": 3, "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


def test_zoo_has_the_five_architectures() -> None:
    assert ZOO == ["convnet", "mobilenetv2", "resnet18", "resnet20", "vgg11_bn"]


@pytest.mark.parametrize("arch", ZOO)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_zoo_forward_gives_one_logit_per_class(arch: str, channels: int, size: int) -> None:
    stats = GRAY if channels == 1 else RGB
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, image_size=size, **stats).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, channels, size, size))
    assert logits.shape == (2, 7) and bool(torch.isfinite(logits).all())
    assert isinstance(model, NormalizedClassifier) and isinstance(model.normalize, Normalize)


@pytest.mark.parametrize("arch", ZOO)
def test_spec_round_trips_through_json(arch: str) -> None:
    model = build_model(arch, num_classes=5, width=0.5, **GRAY)
    spec = json.loads(json.dumps(model.spec))
    assert spec == {
        "arch": arch,
        "num_classes": 5,
        "in_channels": 1,
        "mean": [0.3],
        "std": [0.35],
        "image_size": 32,
        "width": 0.5,
    }
    rebuilt = build_from_spec(spec)
    assert _same_architecture(model, rebuilt)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_width_scales_channels_to_multiples_of_four() -> None:
    full = build_model("resnet20", num_classes=10, **RGB)
    half = build_model("resnet20", num_classes=10, width=0.5, **RGB)
    assert full.net.stem[0].out_channels == 16 and half.net.stem[0].out_channels == 8
    assert sum(p.numel() for p in half.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())
    assert [scaled(16, w) for w in (0.1, 0.3, 0.5, 1.0, 1.3)] == [4, 8, 8, 16, 20]
    assert scaled(1280, 0.25, divisor=8) == 320
    # Rounding never drops more than 10% below the exact product: 16 * 0.3 = 4.8 -> 8, not 4.


def test_weights_follow_the_torch_seed_and_use_kaiming_and_unit_bn() -> None:
    torch.manual_seed(3)
    a = build_model("convnet", num_classes=10, **RGB)
    torch.manual_seed(3)
    b = build_model("convnet", num_classes=10, **RGB)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    conv, bn = a.net.features[3], a.net.features[4]  # 16 -> 32, fan_out = 32 * 9
    assert abs(float(conv.weight.detach().std()) - (2 / (32 * 9)) ** 0.5) < 0.01
    assert torch.equal(bn.weight, torch.ones(32)) and torch.equal(bn.bias, torch.zeros(32))


def test_normalize_math_and_gray_to_rgb_repeat() -> None:
    x = torch.rand(4, 3, 5, 5)
    norm = Normalize([0.2, 0.4, 0.6], [0.5, 0.25, 0.1])
    expected = (x - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.1]).view(
        1, 3, 1, 1
    )
    assert torch.allclose(norm(x), expected)
    assert torch.allclose(norm(torch.full((1, 3, 1, 1), 0.4))[0, 1], torch.zeros(1, 1))
    assert set(norm.state_dict()) == {"mean", "std"} and not list(norm.parameters())
    gray = Normalize([0.5], [0.25], repeat=3)(torch.full((2, 1, 4, 4), 1.0))
    assert gray.shape == (2, 3, 4, 4) and torch.allclose(gray, torch.full_like(gray, 2.0))


def test_model_is_net_of_normalized_input() -> None:
    model = build_model("convnet", num_classes=3, **RGB).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), model.net(model.normalize(x)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0, **RGB}, "num_classes must be a positive integer"),
        ({"num_classes": 10, "in_channels": 3, "mean": [0.5], "std": [0.5]}, "one value per input channel"),
        ({"num_classes": 10, "in_channels": 1, "mean": [0.5], "std": [0.0]}, "std must be positive"),
        ({"num_classes": 10, "width": 0, **RGB}, "width must be a positive number"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model("convnet", **kwargs)


def test_unknown_names_and_bad_specs() -> None:
    with pytest.raises(UnknownNameError, match="known: convnet, detnet, mobilenetv2, resnet18"):
        build_model("resnet21", num_classes=10, **RGB)
    spec = model_spec("convnet", num_classes=10, **RGB)
    with pytest.raises(UserError, match=r"missing keys \['width'\]"):
        build_from_spec({k: v for k, v in spec.items() if k != "width"})
    with pytest.raises(UserError, match=r"unknown keys \['depth'\]"):
        build_from_spec({**spec, "depth": 3})


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix", "bare_net"])
def test_load_state_dict_file_accepts_common_layouts(tmp_path: Path, wrap: str) -> None:
    source = build_model("convnet", num_classes=4, **RGB)
    state = source.state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "bare_net": source.net.state_dict(),
    }[wrap]
    torch.save(payload, tmp_path / "ckpt.pt")
    target = build_model("convnet", num_classes=4, **RGB)
    load_state_dict_file(target, tmp_path / "ckpt.pt")
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())


def test_load_state_dict_file_mismatches_are_one_line_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict_file(build_model("convnet", num_classes=4, **RGB), tmp_path / "missing.pt")
    torch.save(build_model("convnet", num_classes=10, **RGB).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(build_model("convnet", num_classes=4, **RGB), tmp_path / "ten.pt")
    assert "'net.classifier.weight' has shape (10, 64), the model expects (4, 64)" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"lacks 'net\.stem\.0\.weight' \(shape \(16, 3, 3, 3\)\)"):
        load_state_dict_file(build_model("resnet20", num_classes=10, **RGB), tmp_path / "ten.pt")
    state = build_model("convnet", num_classes=4, **RGB).state_dict()
    torch.save({**state, "net.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"first 'net\.extra\.weight'"):
        load_state_dict_file(build_model("convnet", num_classes=4, **RGB), tmp_path / "extra.pt")


def test_load_state_dict_file_refuses_pickled_objects(tmp_path: Path) -> None:
    # A whole pickled module is not a weights-only state_dict: refused, nothing executed.
    torch.save(build_model("convnet", num_classes=4, **RGB), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict_file(build_model("convnet", num_classes=4, **RGB), tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(build_model("convnet", num_classes=4, **RGB), tmp_path / "junk.pt")


# --- torchvision and user factories --------------------------------------------------------------


@pytest.mark.parametrize("stats", [GRAY, RGB], ids=["gray", "rgb"])
def test_torchvision_resnet18_builds_for_gray_and_rgb(stats: dict) -> None:
    model = build_model("torchvision:resnet18", num_classes=6, **stats).eval()
    channels = stats["in_channels"]
    with torch.no_grad():
        assert model(torch.rand(2, channels, 32, 32)).shape == (2, 6)
    assert model.normalize.repeat == (3 if channels == 1 else 1)
    assert _same_architecture(model, build_from_spec(model.spec))


def test_torchvision_errors() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown torchvision model 'resnet19'.*resnet18"):
        build_model("torchvision:resnet19", num_classes=6, **RGB)
    with pytest.raises(UserError, match="3-channel"):
        build_model("torchvision:resnet18", num_classes=6, in_channels=2, mean=[0.5] * 2, std=[0.5] * 2)


def test_importing_models_and_data_does_not_import_torchvision() -> None:
    code = "import sys, toolchain.models, toolchain.data; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_user_factory_gets_the_arguments_it_names() -> None:
    user_models.calls.clear()
    model = build_model("tests.user_models:make", num_classes=7, image_size=28, **GRAY)
    assert user_models.calls == [{"num_classes": 7, "in_channels": 1}]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert model.spec["arch"] == "tests.user_models:make"
    assert _same_architecture(model, build_from_spec(model.spec, trusted=["tests.user_models:make"]))
    no_args = build_model("tests.user_models:make_rgb10", num_classes=10, **RGB)
    assert no_args(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("tests.no_such_module:make", "no module named 'tests.no_such_module'"),
        ("tests.user_models:missing", "has no attribute 'missing'"),
        ("tests.user_models:NOT_CALLABLE", "is a int, not callable"),
        ("tests.user_models:not_a_module", "returned a str, not a torch.nn.Module"),
        (
            "tests.user_models:make_wrong_head",
            r"returns \(1, 7\) for a \(1, 3, 32, 32\) batch; classification needs",
        ),
        ("tests.user_models:make_rgb10", r"fails on a \(1, 1, 32, 32\) input"),
        (":make", "must look like 'package.module:callable'"),
    ],
)
def test_user_factory_errors_are_one_line_user_errors(arch: str, message: str) -> None:
    stats = GRAY if arch.endswith("make_rgb10") else RGB
    with pytest.raises(UserError, match=message) as info:
        build_model(arch, num_classes=5, **stats)
    assert "\n" not in str(info.value)


# --- pruning-readiness --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2", "vgg11_bn"])
def test_zoo_models_are_prunable_with_torch_pruning(arch: str) -> None:
    # Residual adds (resnet20), depthwise convs (mobilenetv2) and a two-layer head (vgg) must
    # all be visible to torch-pruning's dependency graph, or pruning breaks the forward pass.
    model = build_model(arch, num_classes=10, width=0.25, **RGB).eval()
    example = torch.rand(1, 3, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    head = model.net.classifier if arch != "resnet20" else model.net.fc
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[last],
    )
    pruner.step()
    assert model(example).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before


def test_a_spec_never_imports_a_factory_the_user_did_not_name() -> None:
    import tests.user_models as factories

    factories.calls.clear()
    spec = build_model("tests.user_models:make", num_classes=3, image_size=16, **RGB).spec
    factories.calls.clear()
    with pytest.raises(UserError, match=r"names the factory 'tests\.user_models:make'.*never imported"):
        build_from_spec(spec)
    with pytest.raises(UserError, match="did not ask for"):
        build_from_spec({**spec, "arch": "os:system"}, trusted=["tests.user_models:make"])
    assert factories.calls == []  # nothing was called
