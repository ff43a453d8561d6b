"""Reward model accuracy from scores (eval/) and the data hygiene / domain selection of the RM stage."""

import pytest

from align.data.chat import build_byte_tokenizer
from align.data.ranking import (
    apply_hygiene,
    select_domain,
    similarity,
    tokenize_ranked,
    tokenize_ranked_records,
)
from align.data.sources import split_by_prompt
from data_schemas import parse_record
from eval.reward_accuracy import length_baseline_accuracy, ranking_accuracy


def test_accuracy_overall_per_strength_domain_top1_and_margin():
    scores = [[2, 1], [0, 1], [3, 2, 1], [1, 3, 2]]
    strengths = ["better", "better", "significantly_better", None]
    domains = ["helpfulness", "safety", "helpfulness", "safety"]
    m = ranking_accuracy(scores, strengths, domains)
    # pairs: 1/1, 0/1, 3/3, 1/3 (only 3 > 2) -> 5/8
    assert m["rm_accuracy"] == pytest.approx(5 / 8)
    assert m["rm_accuracy/better"] == pytest.approx(0.5)
    assert m["rm_accuracy/significantly_better"] == 1.0
    assert m["rm_accuracy/domain=helpfulness"] == 1.0
    assert m["rm_accuracy/domain=safety"] == pytest.approx(1 / 4)
    assert m["rm_accuracy/adjacent"] == pytest.approx(4 / 6)  # 1, 0, 2/2, 1/2
    assert m["rm_top1_accuracy"] == pytest.approx(0.5)
    assert m["rm_mean_margin"] == pytest.approx((1 - 1 + 2 - 1) / 4)
    assert m["rm_num_records"] == 4 and m["rm_num_pairs"] == 8
    assert "rm_accuracy/None" not in m


def test_ties_count_half():
    m = ranking_accuracy([[1.0, 1.0], [2.0, 2.0, 0.0]])
    assert m["rm_accuracy"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert m["rm_top1_accuracy"] == pytest.approx((0.5 + 0.5) / 2)


def test_length_baseline_scores_responses_by_characters():
    # long > short: right; "abc" vs "xyz" (tie): half; middle ranked above a longer worst: wrong for that pair
    records = [rec(["a long answer", "short"]), rec(["abc", "xyz"]), rec(["longest one", "mid", "longer"])]
    # pairs: 1 | 0.5 | (11 > 3: 1, 11 > 6: 1, 3 > 6: 0)
    assert length_baseline_accuracy(records) == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)


def rec(responses, **kw):
    return parse_record({"prompt": "q", "responses": responses, **kw}, "preference")


def test_min_strength_keeps_unlabelled_records():
    records = [rec(["a", "b"], strength=s) for s in
               ("significantly_better", "better", "slightly_better", "negligibly_better", None)]
    kept, counts = apply_hygiene(records, "better", None)
    assert [r.strength for r in kept] == ["significantly_better", "better", None]
    assert counts["dropped_below_min_strength"] == 2


def test_near_duplicate_responses_are_dropped():
    a, a2, b = "the cat sat on the mat today", "the cat sat on the mat today .", "dogs run fast in the park"
    assert similarity(a, a2) > 0.9 > similarity(a, b)
    kept, counts = apply_hygiene([rec([a, a2, b]), rec([a, a2]), rec([a, b])], None, 0.9)
    assert [len(r.responses) for r in kept] == [2, 2]
    assert [m.content for m in kept[0].responses] == [a, b]
    assert counts == {"dropped_below_min_strength": 0.0, "dropped_near_duplicate_responses": 2.0,
                      "dropped_near_duplicate_records": 1.0}


def test_domain_selection_and_default_domain():
    records = [rec(["a", "b"], domain="safety"), rec(["a", "b"]), rec(["a", "b"], domain="helpfulness")]
    assert len(select_domain(records, "safety", None)) == 1
    assert len(select_domain(records, "safety", "safety")) == 2  # the row without a domain joins
    assert len(select_domain(records, "helpfulness", None)) == 2
    assert len(select_domain(records, None, None)) == 3


def test_split_holds_out_whole_prompts():
    records = [parse_record({"prompt": p, "responses": ["a", str(i)]}, "preference")
               for i, p in enumerate(["Q one", "q  ONE", "Q two", "Q three", "Q four"] * 2)]
    train, held = split_by_prompt(records, 0.25, seed=0)
    assert len(train) + len(held) == 10 and held
    key = lambda r: " ".join(r.prompt[0].content.lower().split())  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len(held) in (2, 4) and split_by_prompt(records, 0.0, 0) == (records, [])


def test_identical_responses_are_dropped_and_counted():
    tok = build_byte_tokenizer()
    records = [rec(["a", "b", " a ", "c"], strength="better"),  # " a " renders as "a": one pair goes
               rec(["same", "same"]),  # nothing left to rank: the record goes
               rec(["x", "y"]), rec(["p", "p", "p"])]
    data = tokenize_ranked_records(tok, records, 64, None, "llama2_large")
    assert data.identical_pairs == 1 + 1 + 3 and data.identical_records == 2
    assert [[m.content for m in r.responses] for r in data.records] == [["a", "b", "c"], ["x", "y"]]
    assert data.examples[0] == tokenize_ranked(tok, data.records[0], 64, None, "llama2_large")
    assert data.examples[0].margin == 2.0 and data.num_pairs == 3 + 1
    assert data.truncated_prompts == data.truncated_responses == 0


def test_truncation_is_counted_and_can_make_responses_identical():
    tok = build_byte_tokenizer()
    long = rec(["abcdefgh one", "abcdefgh two", "z"], strength="better")
    assert tokenize_ranked_records(tok, [long], 64, None, "none").truncated_responses == 0
    data = tokenize_ranked_records(tok, [long], 34, 30, "none")  # prompt: 24 tokens; responses: 10 ("abcdefgh <eot>")
    assert data.truncated_prompts == 0 and data.truncated_responses == 2
    assert data.identical_pairs == 1 and [m.content for m in data.records[0].responses] == ["abcdefgh one", "z"]
    assert tokenize_ranked_records(tok, [long], 34, 8, "none").truncated_prompts == 1


def test_accuracy_split_by_whether_the_shorter_answer_wins_and_the_baseline_by_strength():
    from eval.reward_accuracy import by_length_order, length_baseline

    records = [rec(["a long answer", "short"]), rec(["abc", "xyz"]), rec(["longest one", "mid", "longer"])]
    # pairs (better first) and lengths: (13, 5) longer wins | (3, 3) equal: neither |
    # (11, 3) longer, (11, 6) longer, (3, 6) shorter wins
    scores = [[0.2, 0.9], [1.0, 0.0], [3.0, 1.0, 2.0]]
    # credits: 0 | - | 1, 1 | 0 (score 1.0 < 2.0 on the shorter-wins pair)
    m = by_length_order(scores, records)
    assert m["rm_accuracy/longer_wins"] == pytest.approx(2 / 3) and m["rm_pairs/longer_wins"] == 3
    assert m["rm_accuracy/shorter_wins"] == 0.0 and m["rm_pairs/shorter_wins"] == 1
    strengths = ["better", "better", "slightly_better"]
    b = length_baseline(records, strengths)
    assert b["rm_length_baseline_accuracy"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    assert b["rm_length_baseline_accuracy/better"] == pytest.approx((1 + 0.5) / 2)
    assert b["rm_length_baseline_accuracy/slightly_better"] == pytest.approx(2 / 3)
    # no pair of one kind: its count is 0 and it has no accuracy (not NaN)
    assert by_length_order([[1.0, 0.0]], [rec(["abc", "xyz"])]) == {"rm_pairs/shorter_wins": 0.0,
                                                                  "rm_pairs/longer_wins": 0.0}
