"""How varied and how degenerate a policy's answers are: the checks a reward gain must pass before it counts
(a sentiment reward is easily gamed by "great great great").

- ``distinct_2``: distinct word bigrams over all bigrams of all the answers (Li et al. 2016's corpus-level
  distinct-2): 1.0 when no bigram repeats anywhere, low when the answers say the same things.
- ``word_repeat_rate``: the share of answers in which one word comes three or more times in a row
  (punctuation and case ignored: "Great, great, GREAT!" counts).

Words are runs of letters, digits and apostrophes. Given to align by name (``evaluators: [diversity]``)
through :mod:`eval.plugins`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"[\w']+")
RUN = 3  # a word this many times in a row is a repeat


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def distinct_2(responses: Sequence[str]) -> float:
    """Distinct word bigrams / all word bigrams over ``responses`` (0.0 when there is no bigram)."""
    bigrams = [pair for r in responses for pair in zip(words(r), words(r)[1:], strict=False)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def repeats_a_word(text: str, run: int = RUN) -> bool:
    """Whether one word comes ``run`` or more times in a row in ``text``."""
    ws, streak = words(text), 1
    for a, b in zip(ws, ws[1:], strict=False):
        streak = streak + 1 if a == b else 1
        if streak >= run:
            return True
    return False


class DiversityEvaluator:
    """``evaluators: [diversity]``: distinct_2 and word_repeat_rate of the answers (any prompts)."""

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> dict[str, float]:
        n = max(len(responses), 1)
        return {"distinct_2": distinct_2(responses),
                "word_repeat_rate": sum(repeats_a_word(r) for r in responses) / n}


DIVERSITY_EVALUATOR = DiversityEvaluator()
