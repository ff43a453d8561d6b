"""The diversity evaluator (eval.diversity) against counts worked out by hand, and by name through the
plug-in table."""

import pytest

from align.evaluators import load_evaluators
from eval.diversity import distinct_2, repeats_a_word, words


def test_words_fold_case_and_punctuation():
    assert words("Great, great GREAT! It's 2 good.") == ["great", "great", "great", "it's", "2", "good"]


def test_distinct_2_by_hand():
    # bigrams: (a b) (b c) | (a b) (b d) | none -> 4 bigrams, 3 distinct
    assert distinct_2(["a b c", "A, b d", "single"]) == pytest.approx(3 / 4)
    assert distinct_2(["x"]) == 0.0 and distinct_2([]) == 0.0
    assert distinct_2(["a b", "c d"]) == 1.0


def test_a_repeat_is_three_in_a_row():
    assert repeats_a_word("so great, great, GREAT day")
    assert not repeats_a_word("great day, great food, great people")  # three times, never in a row
    assert not repeats_a_word("very very nice")  # twice in a row
    assert repeats_a_word("very very nice", run=2)


def test_by_name():
    [ev] = load_evaluators(["diversity"])
    out = ev([[], [], [], []], ["good good good", "a b c", "a b c", "fine"])
    assert out["word_repeat_rate"] == pytest.approx(1 / 4)
    # bigrams: (good good) x2, (a b) (b c) x2 -> 6, distinct 3
    assert out["distinct_2"] == pytest.approx(3 / 6)
