"""Llama 2's iteration (RLHF-V1 ... V5): each round annotates the latest policy's answers, and round k's reward
model trains on the annotations of rounds 1..k (``data.accumulate``), nothing else; ``compare_with`` scores the
same held-out records with another reward model, and ``rm_newest_*`` keeps to the records annotated this round."""

import json

import pytest

from align.report_rounds import round_rows, round_summary
from tests.conftest import run_in_one_process

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
LENGTH = "tests.user_evaluators:LENGTH_REWARD"

pytestmark = pytest.mark.usefixtures("one_thread")


def _rm(name: str, accumulate: bool, compare: str) -> dict:
    return {"name": name, "kind": "reward_model", "model": {"path": "builtin:tiny", "tiny": TINY},
            "data": {"from": "annotate", "accumulate": accumulate, "eval_fraction": 0.5},
            "compare_with": {"from": compare},
            "train": {"batch_size": 4, "max_length": 96, "max_steps": 2, "report_to": [], "optim": {"lr": 1e-3}}}


def recipe(accumulate: bool = True) -> dict:
    return {"name": "t", "seed": 0, "rounds": 3, "stages": [
        {"name": "annotate", "kind": "rejection_sampling", "model": {"path": "builtin:tiny", "tiny": TINY},
         "prompts": {"builtin": "world", "builtin_size": 24}, "reward": {"function": LENGTH}, "k": 3,
         "sampling": {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 24}, "min_pair_gap": 0.0},
        _rm("rm", accumulate, "prev.rm"),
        _rm("rm_twin", accumulate, "rm"),  # the same settings and seed as rm: the same model
    ]}


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _key(record) -> str:
    return json.dumps([record["prompt"], [r["content"] for r in record["responses"]]])


def test_round_k_reward_model_trains_on_rounds_1_to_k_annotations(tmp_path):
    records = run_in_one_process(recipe(), tmp_path / "acc")
    by = {(r["round"], r["stage"]): r for r in records}
    pairs = [by[(k, "annotate")]["metrics"]["pairs"] for k in (1, 2, 3)]
    assert all(p > 0 for p in pairs)
    for k in (1, 2, 3):
        m = by[(k, "rm")]["metrics"]
        assert m["train_records"] + m["eval_records"] == sum(pairs[:k])
        annotated = {_key(r) for r in _records(by[(k, "annotate")]["artifacts"]["preferences"])}
        held = [r for r in _records(tmp_path / f"acc/t/round_{k}/rm/eval_scores.jsonl")]
        assert m["rm_newest_records"] == sum(_key(r) in annotated for r in held) > 0
    alone = {(r["round"], r["stage"]): r["metrics"] for r in run_in_one_process(recipe(False), tmp_path / "alone")}
    assert alone[(3, "rm")]["train_records"] + alone[(3, "rm")]["eval_records"] == pairs[2]  # this round's only


def test_compare_with_scores_the_same_held_out_records(tmp_path):
    records = run_in_one_process(recipe(), tmp_path / "cmp")
    by = {(r["round"], r["stage"]): r["metrics"] for r in records}
    assert "compare_rm_accuracy" not in by[(1, "rm")]  # round 1: no previous reward model
    for k in (2, 3):
        assert 0 <= by[(k, "rm")]["compare_rm_accuracy"] <= 1 and "compare_rm_newest_accuracy" in by[(k, "rm")]
    for k in (1, 2, 3):  # the twin of rm scored by rm: the same model, the same numbers
        twin = by[(k, "rm_twin")]
        assert twin["compare_rm_accuracy"] == pytest.approx(twin["rm_accuracy"], abs=1e-9)
        assert twin["compare_rm_newest_accuracy"] == pytest.approx(twin["rm_newest_accuracy"], abs=1e-9)
    header, rows = round_rows(records)
    assert [r[0] for r in rows] == ["V1", "V2", "V3"] and "rm on newest (last round's)" in header
    summary = round_summary(records)
    assert summary[1]["rm/previous_on_newest"] == by[(2, "rm")]["compare_rm_newest_accuracy"]
    assert summary[0]["rm/previous_on_newest"] is None
