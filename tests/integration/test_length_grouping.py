"""``train.group_by_length`` reaches the reward-model and DPO stages: on records of very different lengths
the share of padding in the training batches (``train_padding``) falls when it is on, and the loss of the
whole run is still the loss of the same records (one epoch, each record once)."""

import json

import pytest

from align.config.recipe import recipe_from_dict
from align.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def records(n=24):
    out = []
    for i in range(n):
        short, long = f"ok {i}", ("a long answer " * (1 + 3 * (i % 6))) + str(i)
        out.append({"prompt": f"Question {i}?", "chosen": long if i % 2 else short,
                    "rejected": short + "!" if i % 2 else long + "?"})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("grouping") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return path


def run(tmp, data, kind, grouped):
    stage = {"name": "s", "kind": kind, "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"paths": [str(data)], "eval_fraction": 0.0},
             "train": {"batch_size": 3, "max_length": 256, "epochs": 1, "report_to": [], "group_by_length": grouped,
                       "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}}
    if kind == "reward_model":
        stage["stats_records"] = 0
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp / f"{kind}_{grouped}"),
                               "stages": [stage]})
    (record,) = run_recipe(recipe, log=lambda *_: None)
    return record["metrics"]


@pytest.mark.parametrize("kind", ["reward_model", "dpo"])
def test_grouping_by_length_cuts_padding(tmp_path, data, kind):
    plain, grouped = run(tmp_path, data, kind, False), run(tmp_path, data, kind, True)
    assert plain["steps"] == grouped["steps"] == 8
    assert plain["train_tokens"] == grouped["train_tokens"]  # the same records, once each
    assert grouped["train_padding"] < 0.5 * plain["train_padding"]
    assert plain["train_padding"] > 0.1  # the data leaves padding in plain batches (packing or not)


def test_sft_best_fit_packing_fills_rows_better_than_the_token_budget(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"},
                          {"role": "assistant", "content": "word " * (2 + 7 * (i % 9))}]} for i in range(60)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for strategy in ("best_fit", "budget"):
        stage = {"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
                 "data": {"paths": [str(chats)], "eval_fraction": 0.0}, "packing_strategy": strategy,
                 "train": {"batch_size": 2, "max_length": 128, "epochs": 1, "report_to": [],
                           "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}}
        recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp_path / strategy), "stages": [stage]})
        (record,) = run_recipe(recipe, log=lambda *_: None)
        out[strategy] = record["metrics"]
    assert out["best_fit"]["train_padding"] < 0.5 * out["budget"]["train_padding"]
    assert out["best_fit"]["steps"] <= out["budget"]["steps"]
