"""The sentiment reward (VADER's compound score) against scores worked out by hand from VADER's rules, and
plugged in by name where any programmatic reward and evaluator go."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vaderSentiment", reason="the sentiment reward needs vaderSentiment (the sentiment extra)")

from rewards.sentiment import SENTIMENT_EVALUATOR, SENTIMENT_REWARD, sentiment  # noqa: E402

ALPHA = 15  # VADER normalises a sum s of valences to s / sqrt(s^2 + alpha)
NEGATION = -0.74  # a valence after "not" is scaled by this


def compound(valence: float) -> float:
    return round(valence / math.sqrt(valence * valence + ALPHA), 4)


def test_scores_match_vaders_rules_worked_by_hand():
    # lexicon valences: good 1.9, great 3.1, bad -2.5
    assert sentiment("good") == compound(1.9) == 0.4404
    assert sentiment("great") == compound(3.1) == 0.6249
    assert sentiment("bad") == compound(-2.5) == -0.5423
    assert sentiment("not good") == compound(1.9 * NEGATION) == -0.3412
    assert sentiment("") == 0.0 and sentiment("The table is square.") == 0.0


def test_the_reward_scores_responses_not_prompts():
    prompts = [[{"role": "user", "content": "this is bad"}]] * 2
    scores = SENTIMENT_REWARD(prompts, ["good", "bad"])
    assert scores.tolist() == [0.4404, -0.5423] and str(scores.dtype) == "torch.float64"


def test_the_evaluator_reports_mean_and_shares():
    m = SENTIMENT_EVALUATOR([[]] * 4, ["good", "great", "bad", "The table is square."])
    assert m["sentiment"] == pytest.approx((0.4404 + 0.6249 - 0.5423) / 4)
    assert m["sentiment_positive_rate"] == 0.5 and m["sentiment_negative_rate"] == 0.25


def test_align_finds_both_by_name():
    from align.config.reward import RewardSpec
    from align.evaluators import evaluate_all, load_evaluators
    from align.models.reward_fn import build_reward

    reward = build_reward(RewardSpec(function="sentiment"), lambda spec: spec.path)
    assert reward([[]], ["great"]).tolist() == [0.6249]
    assert evaluate_all(load_evaluators(["sentiment"]), [[]], ["bad"])["sentiment"] == -0.5423


def test_rejection_sampling_keeps_the_most_positive_sample(tmp_path):
    import json

    from align.config.recipe import recipe_from_dict
    from align.runner import run_recipe

    stage = {"name": "rs", "kind": "rejection_sampling",
             "model": {"path": "builtin:tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "num_key_value_heads": 1}},
             "prompts": {"builtin": "world", "builtin_size": 6}, "reward": {"function": "sentiment"},
             "evaluators": ["sentiment"], "k": 4,
             "sampling": {"temperature": 1.0, "max_new_tokens": 12, "batch_size": 6, "seed": 1}}
    (record,) = run_recipe(recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [stage]}),
                           log=lambda *_: None)
    m = record["metrics"]
    assert m["sentiment_best_mean"] >= m["sentiment_sample_mean"]
    for row in map(json.loads, open(record["artifacts"]["sft_records"])):
        assert row["meta"]["score"] == sentiment(row["messages"][-1]["content"])
