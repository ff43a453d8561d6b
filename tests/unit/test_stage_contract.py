"""The stage contract on the config side: one registry of stage kinds, typed inputs and outputs, and a
recipe whose wiring is wrong rejected before anything runs, every problem at once, without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.config.base import MODELS, Artifact
from align.config.checks import BUILTIN_DATA
from align.config.dpo import DPOStage
from align.config.recipe import RecipeError, load_recipe, recipe_from_dict
from align.config.registry import STAGE_BY_KIND, STAGE_TYPES, by_kind
from align.config.sft import SFTStage
from align.runner import STAGE_MODULES
from tests.conftest import load_recipe_or_skip

REPO = Path(__file__).resolve().parents[2]
ROUND = REPO / "recipes" / "llama3_round.yaml"


def base() -> dict:
    return yaml.safe_load(ROUND.read_text())


def problems(data: dict, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data, list(overrides), source="r.yaml")
    return exc.value.problems


def test_every_config_module_imports_on_its_own():
    for name in ("dpo", "sft", "reward_model", "rejection_sampling", "evaluation", "model_average", "recipe",
                 "registry"):
        code = f"import align.config.{name}"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_one_registry_of_stage_kinds():
    assert set(STAGE_BY_KIND) == {"sft", "dpo", "reward_model", "rejection_sampling", "evaluate", "model_average", "gatt",
                                  "ppo"}
    assert tuple(STAGE_BY_KIND.values()) == STAGE_TYPES
    for kind, cls in STAGE_BY_KIND.items():
        assert cls.model_fields["kind"].default == kind
        assert set(cls.produces) <= set(Artifact), kind
    # which module runs each kind is the runner's table (align.runner.stage_module, checked in test_runner)
    assert len(STAGE_MODULES) == len(STAGE_BY_KIND)
    for name in STAGE_MODULES:
        assert importlib.util.find_spec(name) is not None, name


def test_a_kind_defined_twice_is_an_error():
    class SFTAgain(SFTStage):
        """Another class of kind 'sft'."""

    with pytest.raises(TypeError, match="stage kind 'sft' is defined twice: SFTStage and SFTAgain"):
        by_kind((*STAGE_TYPES, SFTAgain))
    with pytest.raises(TypeError, match="stage kind 'dpo' is defined twice"):
        by_kind((DPOStage, SFTStage, DPOStage))


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_input_of_every_recipe_declares_what_it_accepts(path):
    for stage in load_recipe_or_skip(path).stages:
        for inp in stage.inputs():
            assert inp.accepts, f"{path.name}: stages[{stage.name}].{inp.where} declares no accepted artifact"


def test_inputs_carry_their_place_and_types():
    rs = load_recipe(ROUND).stage("rs")
    found = {i.where: i.accepts for i in rs.inputs()}
    assert found["model"] == (Artifact.POLICY,)
    assert found["reward.helpful"] == found["reward.safety"] == (Artifact.REWARD_MODEL,)
    assert found["prompts"][0] == Artifact.PROMPTS


def test_builtin_names_match_the_generators():
    from align.data.builtin import BUILTIN_PREFERENCE, BUILTIN_PROMPTS, BUILTIN_SFT

    assert set(BUILTIN_DATA[Artifact.SFT_RECORDS]) == set(BUILTIN_SFT)
    assert set(BUILTIN_DATA[Artifact.PREFERENCES]) == set(BUILTIN_PREFERENCE)
    assert set(BUILTIN_DATA[Artifact.PROMPTS]) == set(BUILTIN_PROMPTS)


# The four recipes of issue 10, finding 2: each passed validation and failed minutes into the run.
FOUR = {
    "rs.prompts={from: rm_helpful}": "stages[rs].prompts.from: 'rm_helpful' is a reward_model stage, which "
    "produces reward_model; expected prompts, sft_records or preferences",
    "dpo.data={from: eval_sft}": "stages[dpo].data.from: 'eval_sft' is a evaluate stage, which produces "
    "samples; expected preferences",
    "sft.data={builtin: wrld}": "stages[sft].data.builtin: unknown built-in sft_records set 'wrld' (did you "
    "mean 'world'?); known: chat, world, world_chat, world_dialogues",
    "sft.data={paths: [no/such/file.jsonl]}": "stages[sft].data.paths[0]: file not found: no/such/file.jsonl",
}


@pytest.mark.parametrize("override", list(FOUR))
def test_the_four_recipes_are_rejected_with_one_clear_message(override):
    assert problems(base(), [override]) == [FOUR[override]]


def test_align_validate_rejects_them_without_a_traceback_or_torch(tmp_path):
    code = (
        "import sys\n"
        "from align.cli import main\n"
        f"rc = main(['validate', {str(ROUND)!r}, *sys.argv[1:]])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    for override, expected in FOUR.items():
        done = subprocess.run([sys.executable, "-c", code, override], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [f"error: {ROUND}: invalid recipe", f"  - {expected}"]


def test_every_problem_is_reported_at_once():
    found = problems(base(), ["rs.prompts={from: rm_helpful}", "dpo.data={from: eval_sft}",
                              "sft.data={builtin: wrld}", "eval_dpo.reference.from=nope"])
    assert len(found) == 4
    assert any(p.startswith("stages[eval_dpo].reference.from: 'nope' is not an earlier stage") for p in found)


def test_a_model_slot_rejects_the_other_kind_of_model():
    data = base()
    data["stages"].append({"name": "sft3", "kind": "sft", "model": {"from": "rm_helpful"},
                           "data": {"builtin": "world"}})
    (msg,) = problems(data)
    assert msg == ("stages[sft3].model.from: 'rm_helpful' is a reward_model stage, which produces "
                   "reward_model; expected policy")
    data = base()
    data["stages"][4]["reward"]["helpful"] = {"from": "sft"}
    (msg,) = problems(data)
    assert msg.startswith("stages[rs].reward.helpful.from: 'sft' is a sft stage, which produces policy")


def test_outputs_follow_the_stage_settings():
    data = base()
    data["stages"][7]["write_pairs"] = False  # annotate: no pairs file, so DPO has nothing to read
    (msg,) = problems(data)
    assert msg.startswith("stages[dpo].data.from: 'annotate' is a rejection_sampling stage, which produces "
                          "sft_records or samples")


def test_model_average_produces_the_kind_it_averages(tmp_path):
    data = base()
    data["stages"].append({"name": "rm_avg", "kind": "model_average",
                           "models": [{"from": "rm_helpful"}, {"from": "rm_safety"}]})
    data["stages"].append({"name": "rs2", "kind": "rejection_sampling", "model": {"from": "sft"},
                           "prompts": {"builtin": "world"}, "reward": {"model": {"from": "rm_avg"}}})
    recipe_from_dict(data)
    data["stages"].append({"name": "sft_bad", "kind": "sft", "model": {"from": "rm_avg"},
                           "data": {"builtin": "world"}})
    (msg,) = problems(data)
    assert "'rm_avg' is a model_average stage, which produces reward_model; expected policy" in msg
    # from a folder: its config.json says which kind it is
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    avg = STAGE_BY_KIND["model_average"](name="a", models=[{"path": str(folder)}, {"path": str(folder)}])
    assert set(avg.outputs({})) == {Artifact.REWARD_MODEL}
    assert set(avg.outputs({})) < set(MODELS)


def test_missing_local_model_folder_and_accelerate_config():
    found = problems(base(), ["sft.model.path=./no/such/model", "sft.model.tokenizer=null",
                              "sft.launch.accelerate_config=recipes/accelerate/nope.yaml"])
    assert "stages[sft].model.path: no such folder: ./no/such/model" in found
    assert "stages[sft].launch.accelerate_config: file not found: recipes/accelerate/nope.yaml" in found
