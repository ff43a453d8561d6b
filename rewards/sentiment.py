"""A sentiment reward: VADER's compound score of the response, in [-1, 1] (Hutto & Gilbert 2014; the
``vaderSentiment`` package: a lexicon and rules, bundled, no downloads). The known reward of the DPO paper's
controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1), here a judge none of us wrote.

Given to align by name through the plug-in table :mod:`rewards.plugins`: ``reward: {function: sentiment}``
(rejection sampling, PPO, annotation) and ``evaluators: [sentiment]`` (mean score, share of positive and
negative answers). Needs the extra ``align[sentiment]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from rewards.protocol import PerSampleReward


@cache
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError("the sentiment reward needs vaderSentiment: pip install 'align[sentiment]'") from err
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score of ``text``: -1 (most negative) .. 1 (most positive), 0 for no sentiment."""
    return float(_analyzer().polarity_scores(text)["compound"])


SENTIMENT_REWARD = PerSampleReward(lambda prompt, response: sentiment(response))  # reward: {function: sentiment}


class SentimentEvaluator:
    """The responses' sentiment as an evaluator (``evaluators: [sentiment]``; see ``align.evaluators``)."""

    name = "sentiment"  # rejection sampling reports sentiment_best_mean, sentiment_sample_mean, ...

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> dict[str, float]:
        scores = self.score(prompts, responses)
        n = max(len(scores), 1)
        return {"sentiment": sum(scores) / n, "sentiment_positive_rate": sum(s >= 0.05 for s in scores) / n,
                "sentiment_negative_rate": sum(s <= -0.05 for s in scores) / n}

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return [sentiment(r) for r in responses]


SENTIMENT_EVALUATOR = SentimentEvaluator()
