"""The evaluate stage's multi-turn instruction retention on a tiny model: metrics (instruction following,
task accuracy and attention on the instruction, by turn), retention.jsonl as the model saw it, the plot."""

import importlib.util
import json

import pytest
import torch

from align.config.specs import ModelSpec
from align.models.loading import build_tiny_model, load_tokenizer
from tests.conftest import run_in_one_process

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


def steady_tiny(folder):
    """A tiny random Llama whose logits are all zero (final norm zeroed): it answers "!!!..." (token 0),
    never a blank answer, which answers.jsonl cannot hold; its attention is the random model's."""
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tok = load_tokenizer(spec, "builtin:tiny")
    model = build_tiny_model(spec, len(tok), seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def recipe(model_path: str, placement: str) -> dict:
    return {"name": "t", "seed": 0, "stages": [{
        "name": "eval", "kind": "evaluate", "model": {"path": model_path},
        "prompts": {"builtin": "world_eval", "builtin_size": 4},
        "sampling": {"temperature": 0.0, "max_new_tokens": 4, "batch_size": 8},
        "retention": {"dialogues": 4, "turns": 3, "report_turns": [1, 3], "placement": placement,
                      "max_new_tokens": 6},
    }]}


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_evaluate_stage_reports_retention(tmp_path, placement):
    [result] = run_in_one_process(recipe(steady_tiny(tmp_path / "tiny"), placement), tmp_path / "runs")
    m = result["metrics"]
    for t in (1, 3):
        for name in ("instruction", "task", "attention"):
            assert 0.0 <= m[f"retention/{name}_turn_{t}"] <= 1.0
    assert "retention/instruction_turn_2" not in m and m["retention/n"] == 4
    assert {"retention/instruction_mean", "retention/task_mean", "gold_helpfulness"} <= set(m)
    folder = tmp_path / "runs/t/round_1/eval"
    rows = [json.loads(line) for line in open(folder / "retention.jsonl")]
    assert len(rows) == 4
    for row in rows:
        messages = row["messages"]
        assert [x["role"] for x in messages].count("assistant") == 3 and len(row["attention"]) == 3
        if placement == "system":
            assert messages[0] == {"role": "system", "content": row["instruction"]}
        else:
            assert messages[0]["role"] == "user" and messages[0]["content"].startswith(row["instruction"] + " ")
            assert all(row["instruction"] not in x["content"] for x in messages[1:])
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["retention/attention_turn_3"] == m["retention/attention_turn_3"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (folder / "retention.png").stat().st_size > 1000
