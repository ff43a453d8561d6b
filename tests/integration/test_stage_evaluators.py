"""A stage's ``evaluators`` run on what it produced and their metrics join the stage's result: the built-in
world's by name, a user's by dotted path; with none named, none of their metrics appear (a stage that ignored
the field fails here)."""

import json

import pytest

from tests.conftest import run_in_one_process
from tests.integration.test_retention_eval import steady_tiny

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
USER = "tests.user_evaluators:answer_length"
JUDGE = "tests.user_evaluators:LENGTH_JUDGE"
GOLD = {"gold_best_mean", "gold_sample_mean", "gold_first_mean"}
LENGTH = {"length_best_mean", "length_sample_mean", "length_first_mean"}

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(path):
    return [json.loads(line) for line in open(path)]


def rs_recipe(evaluators: list[str]) -> dict:
    return {"name": "t", "seed": 0, "stages": [{
        "name": "rs", "kind": "rejection_sampling", "model": {"path": "builtin:tiny", "tiny": TINY},
        "prompts": {"builtin": "world", "builtin_size": 6}, "reward": {"function": "gold"}, "k": 3,
        "sampling": {"temperature": 1.0, "max_new_tokens": 8, "batch_size": 6, "seed": 1},
        "evaluators": evaluators,
    }]}


def test_rejection_sampling_reports_its_evaluators(tmp_path):
    [result] = run_in_one_process(rs_recipe(["world", USER, JUDGE]), tmp_path / "with")
    m = result["metrics"]
    assert GOLD | LENGTH | {"answer_chars", "answers"} <= set(m)
    assert m["gold_best_mean"] == pytest.approx(m["reward_best_mean"])  # the gold judge is also the reward
    kept = [r["messages"][-1]["content"] for r in rows(result["artifacts"]["sft_records"])]
    assert m["answers"] == len(kept) == m["kept"]  # a plain evaluator judges the kept answers
    assert m["answer_chars"] == pytest.approx(sum(map(len, kept)) / len(kept))
    assert m["length_best_mean"] == m["answer_chars"]
    [bare] = run_in_one_process(rs_recipe([]), tmp_path / "without")
    assert not (GOLD | LENGTH | {"answer_chars"}) & set(bare["metrics"])
    assert not any(k.startswith("best_of_") for k in bare["metrics"])  # best_of not given: no best-of-N


def eval_recipe(model: str, evaluators: list[str]) -> dict:
    return {"name": "t", "seed": 0, "stages": [{
        "name": "eval", "kind": "evaluate", "model": {"path": model},
        "prompts": {"builtin": "world_eval", "builtin_size": 6},
        "sampling": {"temperature": 0.0, "max_new_tokens": 4, "batch_size": 8}, "evaluators": evaluators,
    }]}


def test_evaluation_reports_its_evaluators_and_scores_answers_with_the_first_scorer(tmp_path):
    model = steady_tiny(tmp_path / "tiny")
    [world] = run_in_one_process(eval_recipe(model, ["world", USER]), tmp_path / "world")
    assert {"gold_helpfulness", "safety_violation_rate", "answer_chars", "answers"} <= set(world["metrics"])
    assert all(isinstance(a["score"], float) for a in rows(world["artifacts"]["samples"]))  # the gold score
    [mine] = run_in_one_process(eval_recipe(model, [JUDGE]), tmp_path / "mine")
    assert "gold_helpfulness" not in mine["metrics"] and "length_mean" in mine["metrics"]
    answers = rows(mine["artifacts"]["samples"])
    assert [a["score"] for a in answers] == [float(len(a["response"]["content"])) for a in answers]


def test_rejection_sampling_scores_its_reward_and_a_compared_one_against_the_judge(tmp_path):
    data = rs_recipe([JUDGE])
    data["stages"][0].update(reward={"function": "tests.user_evaluators:LENGTH_REWARD"},
                             compare_reward={"function": "tests.user_evaluators:SHORT_REWARD"})
    [result] = run_in_one_process(data, tmp_path / "cmp")
    m = result["metrics"]
    assert m["length_reward_accuracy"] == 1.0 and m["length_reward_pairs"] > 0  # the reward is the judge / 10
    assert m["length_compare_reward_accuracy"] == 0.0  # its exact opposite
    assert m["length_compare_reward_pairs"] == m["length_reward_pairs"]
    [bare] = run_in_one_process(rs_recipe([]), tmp_path / "bare")
    assert not any("reward_accuracy" in k for k in bare["metrics"])


def test_rejection_sampling_reports_best_of_n_for_each_n(tmp_path):
    data = rs_recipe([JUDGE])
    data["stages"][0].update(reward={"function": "tests.user_evaluators:LENGTH_REWARD"}, best_of=[1, 2, 3])
    [result] = run_in_one_process(data, tmp_path / "bon")
    m = result["metrics"]
    by_prompt: dict[str, list[int]] = {}
    for s in rows(result["artifacts"]["samples"]):  # candidates in the order drawn
        by_prompt.setdefault(json.dumps(s["prompt"]), []).append(len(s["response"]["content"]))
    for n in (1, 2, 3):  # the reward is the length: the longest of the first n, judged by its length
        expected = sum(max(lengths[:n]) for lengths in by_prompt.values()) / len(by_prompt)
        assert m[f"best_of_{n}/length_mean"] == pytest.approx(expected)
        assert m[f"best_of_{n}/prompts"] == len(by_prompt)
    assert m["best_of_1/kl"] == 0.0 and m["best_of_3/kl"] == pytest.approx(1.0986 - 2 / 3, abs=1e-4)
    assert m["best_of_3/length_mean"] == pytest.approx(m["length_best_mean"])
    assert m["best_of_1/length_mean"] == pytest.approx(m["length_first_mean"])
    assert m["best_of_2/length_mean"] > m["best_of_1/length_mean"]  # 6 prompts: some second sample is longer
