"""Model averaging: identical checkpoints average to themselves, different ones to the weighted mean
(causal LM and reward model), mismatches are refused by name, and the stage runs in a recipe."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from align.config.recipe import RecipeError, recipe_from_dict
from align.data.chat import build_byte_tokenizer
from align.runner import run_recipe
from align.stages.model_average import CheckpointMismatchError, average_checkpoints
from tests.conftest import tiny_sft_recipe


def save_tiny(path, seed=0, cls=LlamaForCausalLM, dtype=torch.float32, **size):
    size = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, **size}
    config = LlamaConfig(num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0, **size)
    torch.manual_seed(seed)
    cls(config).to(dtype).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_two_identical_checkpoints_average_to_the_same_weights(tmp_path):
    a = save_tiny(tmp_path / "a")
    metrics = average_checkpoints([a, a], [0.5, 0.5], tmp_path / "avg")
    before, after = weights(a), weights(tmp_path / "avg")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert metrics["rms_distance_to_average"] == 0.0
    assert (tmp_path / "avg" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("cls", [LlamaForCausalLM, "LlamaForSequenceClassification"])
def test_different_checkpoints_average_to_the_weighted_mean(tmp_path, cls):
    import transformers

    cls = getattr(transformers, cls) if isinstance(cls, str) else cls
    a, b = save_tiny(tmp_path / "a", 0, cls), save_tiny(tmp_path / "b", 1, cls)
    average_checkpoints([a, b], [0.25, 0.75], tmp_path / "avg")
    wa, wb, avg = weights(a), weights(b), weights(tmp_path / "avg")
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])
    for name in wa:
        assert torch.allclose(avg[name], 0.25 * wa[name] + 0.75 * wb[name], atol=1e-6), name
    loaded = cls.from_pretrained(tmp_path / "avg")
    assert torch.allclose(loaded.state_dict()["model.norm.weight"], avg["model.norm.weight"])


def test_dtype_is_kept_and_mean_is_taken_in_float32(tmp_path):
    a = save_tiny(tmp_path / "a", 0, dtype=torch.bfloat16)
    b = save_tiny(tmp_path / "b", 1, dtype=torch.bfloat16)
    average_checkpoints([a, b], [0.5, 0.5], tmp_path / "avg")
    wa, wb, avg = weights(a), weights(b), weights(tmp_path / "avg")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert avg[name].dtype == torch.bfloat16
    assert torch.equal(avg[name], ((wa[name].float() + wb[name].float()) / 2).to(torch.bfloat16))


def test_mismatched_architectures_are_refused_naming_both_and_the_difference(tmp_path):
    a = save_tiny(tmp_path / "a")
    wide = save_tiny(tmp_path / "wide", intermediate_size=48)
    with pytest.raises(CheckpointMismatchError) as err:
        average_checkpoints([a, wide], [0.5, 0.5], tmp_path / "avg")
    msg = str(err.value)
    assert str(a) in msg and str(wide) in msg and "'intermediate_size' differs (32 vs 48)" in msg
    # same config, different parameters: a reward model's head vs a causal LM's
    import transformers

    rm = save_tiny(tmp_path / "rm", cls=transformers.LlamaForSequenceClassification)
    config = json.loads((a / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"parameter 'lm_head.weight' is in .*a but not in .*rm"):
        average_checkpoints([a, rm], [0.5, 0.5], tmp_path / "avg")


def two_sfts_then_average(tmp_path, weights=None) -> dict:
    data = tiny_sft_recipe(tmp_path, max_steps=3)
    first = data["stages"][0]
    second = json.loads(json.dumps(first))
    second["name"] = "sft_b"
    second["train"]["optim"]["lr"] = 1e-2
    average = {"name": "avg", "kind": "model_average", "models": [{"from": "sft"}, {"from": "sft_b"}]}
    if weights is not None:
        average["weights"] = weights
    data["stages"] = [first, second, average]
    return data


def test_model_average_runs_in_a_recipe(tmp_path):
    recipe = recipe_from_dict(two_sfts_then_average(tmp_path, weights=[1, 3]))
    records = run_recipe(recipe, log=lambda *_: None)
    by_stage = {r["stage"]: r for r in records}
    paths = [by_stage[s]["artifacts"]["policy"] for s in ("sft", "sft_b", "avg")]
    wa, wb, avg = (load_file(f"{p}/model.safetensors") for p in paths)
    for name in wa:
        assert torch.allclose(avg[name], 0.25 * wa[name] + 0.75 * wb[name], atol=1e-6), name
    assert by_stage["avg"]["metrics"]["models"] == 2
    model = AutoModelForCausalLM.from_pretrained(paths[2])
    tok = AutoTokenizer.from_pretrained(paths[2])
    assert tok.chat_template and model.config.hidden_size == 32
    again = run_recipe(recipe, log=lambda *_: None)  # nothing changed: every stage is skipped
    assert all(r["skipped"] for r in again)


def test_recipe_checks_references_inside_the_model_list(tmp_path):
    data = two_sfts_then_average(tmp_path)
    data["stages"][2]["models"][1] = {"from": "sft_c"}
    with pytest.raises(RecipeError, match=r"stages\[avg\].models\[1\].from: 'sft_c' is not an earlier stage"):
        recipe_from_dict(data)
    data["stages"][2]["models"][1] = {"from": "sft_b"}
    data["stages"][2]["weights"] = [1.0]
    with pytest.raises(RecipeError, match="weights has 1 entries for 2 models"):
        recipe_from_dict(data)
