"""Reward ranking loss against values worked out by hand.

-log sigmoid(d) = log(1 + exp(-d)):  d=1 -> 0.3132617, d=-0.5 -> 0.9740770, d=0 -> 0.6931472,
d=-1 -> 1.3132617, d=2 -> 0.1269280, d=3 -> 0.0485874.
"""

import pytest
import torch

from align.data.ranking import record_margin
from align.losses.reward import MARGIN_TABLES, ranked_pairs, reward_ranking_loss
from data_schemas import parse_record


def loss_of(rewards, sizes, margins=None, **kw):
    r = torch.tensor(rewards, dtype=torch.float32)
    m = None if margins is None else torch.tensor(margins)
    return reward_ranking_loss(r, sizes, m, **kw)


def test_pairwise_no_margin():
    # prompt 1: r = (2, 1) -> d = 1 -> 0.3132617 ; prompt 2: r = (0, 0.5) -> d = -0.5 -> 0.9740770
    loss, metrics = loss_of([2.0, 1.0, 0.0, 0.5], [2, 2])
    assert loss.item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["margin"] == pytest.approx((1.0 - 0.5) / 2)


def test_pairwise_with_margins():
    # margins 1 and 0.5: d = 2 - 1 - 1 = 0 -> 0.6931472 ; d = 0 - 0.5 - 0.5 = -1 -> 1.3132617
    loss, _ = loss_of([2.0, 1.0, 0.0, 0.5], [2, 2], [1.0, 0.5])
    assert loss.item() == pytest.approx((0.6931472 + 1.3132617) / 2, abs=1e-6)


def test_three_responses_margin_only_on_pairs_with_the_last_response():
    # r = (3, 1, 0), m = 1. Pairs: (0,1) d=2 (no margin: the worse one is not the last) -> 0.1269280,
    # (0,2) d=3-1=2 -> 0.1269280, (1,2) d=1-1=0 -> 0.6931472; mean over the 3 pairs.
    loss, metrics = loss_of([3.0, 1.0, 0.0], [3], [1.0])
    assert loss.item() == pytest.approx((0.1269280 * 2 + 0.6931472) / 3, abs=1e-6)
    assert metrics["accuracy"] == 1.0 and metrics["margin"] == pytest.approx(3.0)
    # no margin: d = 2, 3, 1
    loss, _ = loss_of([3.0, 1.0, 0.0], [3])
    assert loss.item() == pytest.approx((0.1269280 + 0.0485874 + 0.3132617) / 3, abs=1e-6)


def test_prompts_weigh_the_same_and_sum_reduction():
    # prompt A: 3 responses (3, 1, 0) -> 0.1629257 ; prompt B: (2, 1) -> 0.3132617
    mean, _ = loss_of([3.0, 1.0, 0.0, 2.0, 1.0], [3, 2])
    total, metrics = loss_of([3.0, 1.0, 0.0, 2.0, 1.0], [3, 2], reduction="sum")
    assert mean.item() == pytest.approx((0.1629257 + 0.3132617) / 2, abs=1e-6)
    assert total.item() == pytest.approx(0.1629257 + 0.3132617, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(2.0)  # summed over prompts, like the loss


def test_centering_matches_trl_form():
    # r = (2, 1), coef 0.1: 0.3132617 + 0.1 * (2 + 1)^2
    loss, metrics = loss_of([2.0, 1.0], [2], centering_coef=0.1)
    assert loss.item() == pytest.approx(0.3132617 + 0.9, abs=1e-6)
    assert metrics["centering"] == pytest.approx(9.0)


def test_gradient_pushes_best_up_and_worst_down():
    r = torch.zeros(3, requires_grad=True)
    loss, _ = reward_ranking_loss(r, [3])
    loss.backward()
    assert r.grad[0] < 0 < r.grad[2] and abs(r.grad[1]) < 1e-7


def test_pairs_and_bad_sizes():
    better, worse, prompt, last = ranked_pairs([3, 2])
    assert better.tolist() == [0, 0, 1, 3] and worse.tolist() == [1, 2, 2, 4]
    assert prompt.tolist() == [0, 0, 0, 1] and last.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="at least 2"):
        ranked_pairs([1])
    with pytest.raises(ValueError, match="5 rewards for 4"):
        loss_of([0.0] * 5, [2, 2])


def test_margin_tables_and_column():
    rec = parse_record({"prompt": "q", "responses": ["a", "b"], "strength": "better"}, "preference")
    assert record_margin(rec, "llama2_small") == pytest.approx(2 / 3)
    assert record_margin(rec, "llama2_large") == 2.0
    assert record_margin(rec, "none") == 0.0
    assert record_margin(rec, {"better": 0.25}) == 0.25
    assert MARGIN_TABLES["llama2_small"]["negligibly_better"] == 0.0
    unlabelled = parse_record({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}, "preference")
    assert record_margin(unlabelled, "llama2_large") == 0.0
    assert record_margin(unlabelled, "column") == 1.5
    with pytest.raises(ValueError, match="margin"):
        record_margin(rec, "column")
