"""Every recipe validates; typos and bad references give errors a person can act on."""

from pathlib import Path

import pytest
import yaml

from align.config.recipe import RecipeError, recipe_from_dict
from tests.conftest import load_recipe_or_skip

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe_or_skip(path)
    assert recipe.stages


def base():
    return yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "llama3_round.yaml").read_text())


def problems(data, overrides=()):
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data, list(overrides), source="r.yaml")
    return exc.value.problems


def test_typo_in_nested_key_names_path_and_suggests():
    data = base()
    data["stages"][0]["train"]["optim"]["lrr"] = 1e-3
    assert problems(data) == ["stages[sft].train.optim.lrr: unknown key (did you mean 'lr'?)"]


def test_typo_in_top_level_and_stage_key():
    data = base()
    data["sed"] = 1
    data["stages"][0]["trian"] = {}
    found = problems(data)
    assert "sed: unknown key (did you mean 'seed'?)" in found
    assert "stages[sft].trian: unknown key (did you mean 'train'?)" in found


def test_unknown_kind_lists_known_kinds():
    data = base()
    data["stages"][0]["kind"] = "sfx"
    (msg,) = problems(data)
    assert msg.startswith("stages[sft]: unknown stage kind 'sfx'") and "sft" in msg


def test_reference_to_missing_or_later_stage_is_caught():
    data = base()
    second = {**data["stages"][0], "name": "sft2", "model": {"from": "sftt"}}
    data["stages"].append(second)
    (msg,) = problems(data)
    assert msg == "stages[sft2].model.from: 'sftt' is not an earlier stage (did you mean 'sft'?)"


def test_overrides_apply_and_are_checked():
    recipe = recipe_from_dict(base(), ["seed=7", "sft.train.optim.lr=1e-4", "sft.train.max_steps=3"])
    assert recipe.seed == 7
    assert recipe.stage("sft").train.optim.lr == 1e-4 and recipe.stage("sft").train.max_steps == 3
    assert problems(base(), ["sftt.train.lr=1"]) == ["override 'sftt.train.lr': no stage named 'sftt' (did you mean 'sft'?)"]
    assert problems(base(), ["sft.train.batch_size=0"])[0].startswith("stages[sft].train.batch_size:")


def test_override_of_a_defaulted_nested_spec_keeps_its_other_defaults():
    data = base()
    data["stages"].append({"name": "ev", "kind": "evaluate", "model": {"from": "sft"}})
    recipe = recipe_from_dict(data, ["ev.prompts.builtin_size=40", "ev.sampling.max_new_tokens=8"])
    ev = recipe.stage("ev")
    assert (ev.prompts.builtin, ev.prompts.builtin_size) == ("world_eval", 40)
    assert (ev.sampling.max_new_tokens, ev.sampling.temperature) == (8, 0.0)


def test_model_needs_exactly_one_source():
    data = base()
    data["stages"][0]["model"]["from"] = "x"
    assert any("exactly one of 'path' and 'from'" in p for p in problems(data))


def test_validation_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from align.config.recipe import load_recipe; "
        f"load_recipe({str(RECIPES[0])!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["ppo", "dpo_vs_ppo"])
def test_ppo_recipes_share_the_default_rounds_stages_exactly(name):
    """README: recipes/ppo.yaml and recipes/dpo_vs_ppo.yaml start from the default round's RS-SFT policy and
    reward models; a finished default round's stages are reused by them (same settings, same fingerprints)."""
    default = recipe_from_dict(base(), [], source="llama3_round.yaml")
    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    recipe = recipe_from_dict(yaml.safe_load(path.read_text()), [], source=f"{name}.yaml")
    names = [s.name for s in default.stages]
    shared = [s.name for s in recipe.stages if s.name in names]
    assert shared == sorted(shared, key=names.index) and {"sft", "rm_helpful", "rm_safety", "rs", "sft_rs"} <= set(shared)
    for stage in shared:
        assert recipe.stage(stage).model_dump() == default.stage(stage).model_dump(), stage
