"""Best-of-N (align.stages.best_of_n): the analytic KL, the pick among the first N samples, and the metrics by N,
against values worked out by hand."""

import math

import pytest

from align.stages.best_of_n import best_of_n_kl, best_of_n_metrics, pick_first_n


def test_kl_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6363
    assert best_of_n_kl(64) == pytest.approx(4.1589 - 0.984375, abs=1e-4)


def test_pick_among_the_first_n_in_order():
    samples = [["a", "b", "c", "d"], ["x", "", "y"], [""]]
    scores = [{"a": 0.1, "b": 0.5, "c": 0.9, "d": 0.2}, {"x": 0.3, "y": 0.3}, {}]
    assert pick_first_n(samples, scores, 1) == ["a", "x", None]
    assert pick_first_n(samples, scores, 2) == ["b", "x", None]  # the blank one has no score: passed over
    assert pick_first_n(samples, scores, 4) == ["c", "x", None]  # equal scores: the first wins


def test_metrics_by_n():
    def judge(prompts, responses):
        return {"chars": sum(map(len, responses)) / len(responses)}

    samples = [["aa", "aaaa"], ["b", "bbb"]]
    scores = [{"aa": 1.0, "aaaa": 0.0}, {"b": 0.0, "bbb": 1.0}]
    m = best_of_n_metrics([judge], ["p", "q"], samples, scores, [1, 2])
    assert m["best_of_1/chars"] == 1.5 and m["best_of_2/chars"] == 2.5  # (2 + 1) / 2, (2 + 3) / 2
    assert m["best_of_1/kl"] == 0.0 and m["best_of_2/kl"] == pytest.approx(math.log(2) - 0.5)
    assert m["best_of_2/prompts"] == 2.0
