"""rewards/: the Llama 2 helpfulness/safety combination, whitening, and the (prompt, response) ids."""

import math

import pytest
import torch

from align.data.chat import build_byte_tokenizer
from data_schemas import Message
from rewards.combine import CombinedReward, combine_scores
from rewards.encoding import encode_pair, encode_prompt, encode_response, truncate
from rewards.whitening import RewardStats, compute_stats, logit, sigmoid, whiten, whiten_probability

LOGIT_015 = math.log(0.15 / 0.85)  # -1.7346: sigmoid(r) < 0.15  <=>  r < -1.7346


def test_combination_rule_on_hand_made_cases():
    helpful = [2.0, 2.0, 2.0, 2.0, 2.0]
    safety = [3.0, -2.0, 0.0, -1.70, -1.76]  # sigmoid: 0.953, 0.119, 0.5, 0.1545, 0.1468
    tagged = [True, False, False, False, False]
    combined, used = combine_scores(helpful, safety, tagged, threshold_scale="sigmoid")
    assert used == [True, True, False, False, True]  # tagged; low safety score; neither; just above; below
    assert combined == [3.0, -2.0, 2.0, 2.0, -1.76]
    assert -1.76 < LOGIT_015 < -1.70


def test_combination_threshold_scales_and_custom_rule():
    _, used = combine_scores([1.0, 1.0], [0.1, 0.2], threshold_scale="raw")
    assert used == [True, False]
    # whitened (the default): sigmoid((raw - 1) / 2): raw -2.6 -> -1.8 -> 0.1419 < 0.15; raw -2.4 -> -1.7 ->
    # 0.1545; raw 1.0 -> 0 -> 0.5. On the raw sigmoid scale: 0.069, 0.083 and 0.731.
    stats = RewardStats(mean=1.0, std=2.0, count=10)
    _, used = combine_scores([1.0] * 3, [-2.6, -2.4, 1.0], safety_stats=stats)
    assert used == [True, False, False]
    _, used = combine_scores([1.0] * 3, [-2.6, -2.4, 1.0], threshold_scale="sigmoid")
    assert used == [True, True, False]
    # a safety model whose every score sits 3 below zero (a Bradley-Terry offset): raw sigmoid 0.047 takes all
    # of them for unsafe; whitened with its own mean and std they are ordinary (0.5, 0.73, 0.27)
    offset = RewardStats(mean=-3.0, std=1.0, count=10)
    _, used = combine_scores([1.0] * 3, [-3.0, -2.0, -4.0], safety_stats=offset)
    assert used == [False, False, False]
    assert combine_scores([1.0] * 3, [-3.0, -2.0, -4.0], threshold_scale="sigmoid")[1] == [True] * 3
    with pytest.raises(ValueError, match="needs the safety model's stats"):
        combine_scores([1.0], [0.0])
    _, used = combine_scores([0.0], [5.0], [True], rule=lambda tagged, value, threshold: False,
                             threshold_scale="raw")
    assert used == [False]
    with pytest.raises(ValueError, match="2 helpfulness scores but 1"):
        combine_scores([0.0, 1.0], [0.0])


class FixedScorer:
    def __init__(self, scores, stats):
        self.scores, self.stats = scores, stats

    def score(self, prompts, responses, batch_size=8):
        return list(self.scores)


def test_combined_reward_whitens_with_the_chosen_models_stats():
    helpful = FixedScorer([3.0, 3.0], RewardStats(mean=1.0, std=2.0, count=4))
    safety = FixedScorer([-2.0, 0.0], RewardStats(mean=-1.0, std=0.5, count=4))
    out = CombinedReward(helpful, safety).score(["q1", "q2"], ["a", "b"])
    assert out.used_safety == [True, False]
    assert out.reward == pytest.approx([(-2.0 + 1.0) / 0.5, (3.0 - 1.0) / 2.0])
    raw = CombinedReward(helpful, safety, whiten=False).score(["q1", "q2"], ["a", "b"], is_safety=[False, True])
    assert raw.reward == [-2.0, 0.0] and raw.helpful == [3.0, 3.0]
    with pytest.raises(ValueError, match="reward_stats"):
        CombinedReward(FixedScorer([0.0], None), safety)
    with pytest.raises(ValueError, match="threshold_scale='whitened' needs"):  # when built, not when scoring
        CombinedReward(helpful, FixedScorer([0.0], None), whiten=False)
    CombinedReward(helpful, FixedScorer([0.0], None), whiten=False, threshold_scale="sigmoid")


def test_score_and_count_reports_how_often_the_safety_model_scored_an_untagged_prompt():
    from align.models.reward_fn import score_and_count

    helpful = FixedScorer([3.0, 3.0, 3.0, 3.0], RewardStats(mean=1.0, std=2.0, count=4))
    # whitened with mean -1, std 0.5: -2.0 -> -2 (sigmoid 0.12: safety), 0.0 -> +2 (helpful)
    safety = FixedScorer([-2.0, 0.0, -2.0, 0.0], RewardStats(mean=-1.0, std=0.5, count=4))
    scores, untagged, by_safety = score_and_count(CombinedReward(helpful, safety), ["a", "b", "c", "d"],
                                                  ["w", "x", "y", "z"], [False, False, True, True])
    assert (untagged, by_safety) == (2, 1)  # the tagged prompts use the safety score and are not counted
    assert scores.tolist() == pytest.approx([-2.0, 1.0, -2.0, 2.0])
    assert score_and_count(lambda p, r, t: torch.tensor([0.5]), ["a"], ["b"], [False])[1:] == (0, 0)


def test_whitening(tmp_path):
    stats = compute_stats([1.0, 2.0, 3.0, 4.0], max_length=64)
    assert stats.mean == 2.5 and stats.std == pytest.approx(math.sqrt(1.25)) and stats.count == 4
    assert whiten([1.0, 4.0], stats) == pytest.approx([-1.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25)])
    t = whiten(torch.tensor([2.5, 3.5]), stats)
    assert torch.allclose(t, torch.tensor([0.0, 1 / math.sqrt(1.25)]))
    # Llama 2's WHITEN(LOGIT(R)) on sigmoid-scale scores equals whitening the raw score
    assert whiten_probability(sigmoid(3.0), stats) == pytest.approx(whiten(3.0, stats), abs=1e-6)
    assert logit(0.5) == 0.0 and logit([sigmoid(-2.0)]) == pytest.approx([-2.0])
    stats.save(tmp_path)
    assert RewardStats.load(tmp_path) == stats and RewardStats.load(tmp_path / "none") is None


def test_response_ids_follow_the_prompt_and_match_the_template():
    tok = build_byte_tokenizer()
    prompt = [Message(role="user", content="What is 2 plus 2?")]
    encoded = encode_prompt(tok, prompt)
    response = encode_response(tok, prompt, "4.", encoded)
    full = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"},
                                    {"role": "assistant", "content": "4."}], tokenize=True, return_dict=True)
    assert encoded[1] + response == list(full["input_ids"])
    assert response[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert encode_pair(tok, "What is 2 plus 2?", {"role": "assistant", "content": "4."}) == encoded[1] + response


def test_truncation_rule():
    prompt, (short, long) = truncate(list(range(10)), [[50, 51], list(range(100, 110))], 8, 4)
    assert prompt == [6, 7, 8, 9]  # last 4 prompt tokens
    assert short == [50, 51] and long == [100, 101, 102, 109]  # cut to 4, final token kept
    assert truncate([1, 2], [[3, 4]], None) == ([1, 2], [[3, 4]])
    assert truncate([1, 2, 3], [[4]], 8, None)[0] == [1, 2, 3]  # default: max_length // 2 = 4
