"""The Llama 2 safety threshold is a setting of ``combine_scores``: which score is used, and so which
sample best-of-K keeps, changes between threshold 0.15 (Llama 2) and 0.5, and between the sigmoid and
the raw scale. Worked out by hand:

    safety raw   -2.0    -1.0    -0.3    0.5     2.0
    sigmoid      0.119   0.269   0.426   0.622   0.881
    helpful      1.0     4.0     3.0     2.0     0.5
"""

import pytest

from rewards.combine import LLAMA2_SAFETY_THRESHOLD, combine_scores
from rewards.whitening import RewardStats

HELPFUL = [1.0, 4.0, 3.0, 2.0, 0.5]
SAFETY = [-2.0, -1.0, -0.3, 0.5, 2.0]


def best(scores):
    return max(range(len(scores)), key=scores.__getitem__)


@pytest.mark.parametrize("threshold,scale,used,pick", [
    (0.15, "sigmoid", [True, False, False, False, False], 1),  # only 0.119 < 0.15: helpful 4.0 wins
    (0.5, "sigmoid", [True, True, True, False, False], 3),  # -2, -1, -0.3, 2.0, 0.5: sample 3
    (0.6, "sigmoid", [True, True, True, False, False], 3),
    (0.6, "raw", [True, True, True, True, False], 3),  # -2, -1, -0.3, 0.5, 0.5: a tie, the first is kept
    (-1.5, "raw", [True, False, False, False, False], 1),
])
def test_threshold_and_scale_decide_the_score_and_the_pick(threshold, scale, used, pick):
    combined, got_used = combine_scores(HELPFUL, SAFETY, threshold=threshold, threshold_scale=scale)
    assert got_used == used
    assert combined == [s if u else h for h, s, u in zip(HELPFUL, SAFETY, used, strict=True)]
    assert best(combined) == pick


def test_default_is_llama2_015_on_the_whitened_scale():
    # stats that whiten nothing (mean 0, std 1): the default scale is then the paper's sigmoid scale
    identity = RewardStats(mean=0.0, std=1.0, count=10)
    assert LLAMA2_SAFETY_THRESHOLD == 0.15
    default = combine_scores(HELPFUL, SAFETY, safety_stats=identity)
    assert default == combine_scores(HELPFUL, SAFETY, threshold=0.15, threshold_scale="sigmoid")
    assert default[1] != combine_scores(HELPFUL, SAFETY, threshold=0.5, safety_stats=identity)[1]
    # a model whose scores sit 1 higher: the raw sigmoid scale lets the offset decide, the default does not
    shifted = [s + 1.0 for s in SAFETY]
    assert combine_scores(HELPFUL, shifted, safety_stats=RewardStats(mean=1.0, std=1.0, count=10)) == (
        [s + 1.0 if u else h for h, s, u in zip(HELPFUL, SAFETY, default[1], strict=True)], default[1])
    assert combine_scores(HELPFUL, shifted, threshold_scale="sigmoid")[1] == [False] * 5
