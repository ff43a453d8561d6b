"""SFT on a tiny model: weights change, loss falls, the checkpoint reloads with plain transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.config.recipe import recipe_from_dict
from align.data.chat import tokenize_prompt
from align.models.loading import build_tiny_model, load_tokenizer
from align.runner import run_recipe, run_stage
from tests.conftest import tiny_sft_recipe


def _run(tmp_path, **kw):
    data = tiny_sft_recipe(tmp_path, **kw.pop("train", {}))
    data["stages"][0].update(kw)
    recipe = recipe_from_dict(data)
    (record,) = run_recipe(recipe, log=lambda *_: None)
    return recipe, record


@pytest.mark.parametrize("packing", [True, False])
def test_sft_lowers_loss_and_changes_weights(tmp_path, packing):
    recipe, record = _run(tmp_path, packing=packing, train={"max_steps": 12})
    m = record["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["eval_loss"] < m["eval_loss_before"]
    stage = recipe.stage("sft")
    before = build_tiny_model(stage.model, len(load_tokenizer(stage.model, "builtin:tiny")), seed=recipe.seed)
    after = AutoModelForCausalLM.from_pretrained(record["artifacts"]["policy"])
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.state_dict()[n])]
    assert len(changed) == len(list(after.parameters()))
    rows = [json.loads(x) for x in open(tmp_path / "runs/t/round_1/sft/metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))


def test_checkpoint_reloads_and_generates_with_plain_transformers(tmp_path):
    _, record = _run(tmp_path)
    path = record["artifacts"]["policy"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.convert_tokens_to_ids("<|eot_id|>") == model.generation_config.eos_token_id
    ids = torch.tensor([tokenize_prompt(tok, [{"role": "user", "content": "What is 2 plus 3?"}])])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 8
    assert torch.equal(out[0, : ids.shape[1]], ids[0])  # the prompt is kept, new tokens follow
    new = out[0, ids.shape[1]:].tolist()
    assert all(0 <= t < len(tok) for t in new)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot not in new[:-1]  # generation stops at the first end-of-turn token
    # greedy decoding is deterministic: the checkpoint generates the same tokens again
    assert model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist() == out[0].tolist()


def test_lora_trains_adapter_and_saves_merged_model(tmp_path):
    _, record = _run(
        tmp_path,
        model={"path": "builtin:tiny", "lora": {"r": 4, "alpha": 8},
               "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1}},
        train={"max_steps": 8, "optim": {"lr": 1e-2, "warmup_ratio": 0.0}},
    )
    assert record["metrics"]["train_loss_last"] < record["metrics"]["train_loss_first"]
    path = record["artifacts"]["policy"]
    assert (tmp_path / "runs/t/round_1/sft/model/adapter/adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path)  # merged: no peft needed
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_gradient_checkpointing_runs(tmp_path):
    _, record = _run(
        tmp_path,
        model={"path": "builtin:tiny", "gradient_checkpointing": True,
               "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1}},
        train={"max_steps": 3},
    )
    assert record["metrics"]["steps"] == 3


def test_rows_cut_or_dropped_for_length_and_epochs_past_max_steps_are_reported(tmp_path, capsys, one_thread):
    def row(user, answer):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    rows = [row(f"hi {i}", f"ok {i}") for i in range(8)]  # fit max_length=96
    rows += [row(f"hi {i}", "long answer " * 10) for i in range(4)]  # cut, assistant tokens left: kept
    rows += [row("long question " * 10, "ok") for i in range(4)]  # no assistant token within 96: dropped
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_sft_recipe(tmp_path, max_steps=6)
    recipe["stages"][0].update(data={"paths": [str(data)]}, packing=False)
    m = run_stage(recipe_from_dict(recipe), "sft", 1, "fp").metrics  # in this process: its log is captured
    assert m["truncated_rows"] == 8 and m["dropped_too_long"] == 4
    assert m["epochs_trained"] == 2.0  # 12 rows, 4 a step: 3 steps an epoch
    out = capsys.readouterr().out
    assert "[sft] 8 of 16 rows cut at max_length=96; 4 of them dropped: no assistant token left" in out
    assert "[sft] max_steps=6 > 1 epoch = 3 steps: training 2.00 epochs (max_steps overrides epochs)" in out
