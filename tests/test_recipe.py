"""The recipe: YAML in, validated object out; every mistake is one clear error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from toolchain.errors import RecipeError
from toolchain.recipe import Recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_fraction_eps_is_parsed() -> None:
    recipe = recipe_from_dict({"train": {"attack": {"eps": "8/255", "step_size": "2/255"}}})
    assert recipe.train.attack.eps == pytest.approx(8 / 255)
    assert recipe.train.attack.step_size == pytest.approx(2 / 255)
    assert recipe.prune.target.macs_reduction == 4.0


def test_every_shipped_recipe_validates() -> None:
    examples = REPO / "deploy_examples"
    paths = sorted([*examples.glob("*.yaml"), *examples.glob("*/recipe.yaml")])
    assert paths, "deploy_examples has no recipes"
    for path in paths:
        assert isinstance(load_recipe(path), Recipe)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"attack": {"eps": "8/x"}}}, "train.attack.eps"),
        ({"version": 7}, "unsupported recipe version 7"),
        ({"prune": {"target": {"macs_reduction": 2.0, "params_reduction": 2.0}}}, "exactly one"),
        ({"prune": {"target": {"macs_reduction": 0.5}}}, "prune.target.macs_reduction"),
        ({"validate": {"corruptions": {"severities": [0, 6]}}}, "severities must be 1..5"),
        ({"name": "../escape"}, "name"),
    ],
)
def test_bad_recipes_name_the_problem(raw: dict, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_apply_typed_values() -> None:
    recipe = recipe_from_dict({}, ["train.epochs=2", "prune.criterion=taylor", "validate.runtimes=[torch]"])
    assert recipe.train.epochs == 2
    assert recipe.prune.criterion == "taylor"
    assert recipe.validate.runtimes == ["torch"]
    with pytest.raises(RecipeError, match=r"section\.key=value"):
        recipe_from_dict({}, ["train.epochs"])
    with pytest.raises(RecipeError, match=r"unknown key 'train\.nope'"):
        recipe_from_dict({}, ["train.nope=1"])


def test_section_hash_changes_only_with_its_sections() -> None:
    a = recipe_from_dict({})
    b = recipe_from_dict({"finetune": {"epochs": 9}})
    assert a.section_hash("data", "model", "train") == b.section_hash("data", "model", "train")
    assert a.section_hash("finetune") != b.section_hash("finetune")
    assert a.sha256() != b.sha256()


def test_data_seed_picks_the_images_and_hashes_as_before_when_unset() -> None:
    plain = recipe_from_dict({"seed": 3})
    assert plain.data_seed == 3
    # unset: the same hash as a recipe written before data.seed (and allow_unverified,
    # quantize.qat and quantize.bias_correction) existed
    dump = plain.model_dump(mode="json")
    del dump["task"], dump["data"]["seed"], dump["allow_unverified"], dump["quantize"]["qat"]
    del dump["quantize"]["bias_correction"]
    assert plain.sha256() == hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
    pinned = recipe_from_dict({"seed": 3, "data": {"seed": 0}})
    assert pinned.data_seed == 0
    assert pinned.section_hash("data") != plain.section_hash("data")
    assert pinned.sha256() != plain.sha256()


def test_bias_correction_hashes_only_when_set() -> None:
    plain = recipe_from_dict({})
    off = recipe_from_dict({"quantize": {"bias_correction": False}})
    on = recipe_from_dict({"quantize": {"bias_correction": True}})
    assert not plain.quantize.bias_correction
    assert off.sha256() == plain.sha256() and off.section_hash("quantize") == plain.section_hash("quantize")
    assert on.sha256() != plain.sha256() and on.section_hash("quantize") != plain.section_hash("quantize")


def test_data_seed_keeps_the_same_validation_images() -> None:
    from toolchain.preflight import check

    def val_images(seed: int, data_seed: int | None = None) -> torch.Tensor:
        data = {"train_samples": 8, "val_samples": 8, "image_size": 16, "seed": data_seed}
        bundle = check(recipe_from_dict({"seed": seed, "data": data}))
        return torch.stack([bundle.val[i][0] for i in range(8)])

    base = val_images(0)
    assert not torch.equal(val_images(1), base)  # the capped subset follows the seed...
    assert torch.equal(val_images(1, data_seed=0), base)  # ...unless data.seed pins it


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(scalar)
