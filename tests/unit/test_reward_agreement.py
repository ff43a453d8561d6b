"""The reward's accuracy on one policy's own samples against a judge, worked by hand."""

import pytest

from align.stages.reward_agreement import pair_agreement


def test_pair_agreement_by_hand():
    reward = [[5.0, 3.0, 1.0], [2.0, 2.0, 7.0]]
    judge = [[1.0, 0.1, 0.4], [1.0, 0.0, 0.1]]
    out = pair_agreement(reward, judge, [False, True], gap=0.25)
    # helpfulness prompt: (0,1) right, (0,2) right, (1,2) judge prefers 2, reward 1 < 3: wrong -> 2/3
    # safety prompt: (0,1) reward tie -> 1/2, (0,2) judge prefers 0, reward 2 < 7: wrong, (1,2) gap 0.1: skipped
    assert out == pytest.approx({"reward_accuracy": 2.5 / 5, "reward_pairs": 5.0,
                                 "reward_accuracy/helpfulness": 2 / 3, "reward_accuracy/safety": 0.25})


def test_gap_and_prefix_are_used():
    reward, judge = [[1.0, 2.0]], [[0.3, 0.0]]
    assert pair_agreement(reward, judge, [False], gap=0.25, prefix="gold_reward") == {
        "gold_reward_accuracy": 0.0, "gold_reward_pairs": 1.0, "gold_reward_accuracy/helpfulness": 0.0}
    assert pair_agreement(reward, judge, [False], gap=0.3) == {}  # 0.3 is not more than the gap


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 rewards but 3 judge scores"):
        pair_agreement([[1.0, 2.0]], [[1.0, 0.0, 0.5]], [False])
