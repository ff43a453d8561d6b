"""The Llama 2 combination of a Helpfulness and a Safety reward model (Llama 2, sec. 3.2.3)::

    R_c = R_s   if is_safety(prompt) or R_s < 0.15
          R_h   otherwise
    reward = WHITEN(LOGIT(R_c))

``R_s``, ``R_h`` are on the sigmoid scale in the paper. Our models output raw logits ``r``. Where the
threshold is compared (``threshold_scale``):

- ``"whitened"`` (default): ``sigmoid`` of the safety score whitened with the safety model's statistics,
  so 0.15 means 1.73 standard deviations below the model's mean score. A Bradley-Terry model learns score
  differences only: its raw scores carry an arbitrary offset, and on answers unlike its training data (a
  safety model trained on harmful requests and their look-alikes, scoring "The capital of Vantor is Loam.")
  ``sigmoid(raw) < 0.15`` can hold for most ordinary answers. The safety score then replaces the
  helpfulness score on most helpfulness prompts and carries no information about them (measured in the
  built-in world: 80% of the samples of helpfulness prompts, and best-of-8 kept answers 0.828 instead of
  0.853 under the gold judge). Llama 2's safety model gave calibrated probabilities: it was trained with 10%
  helpfulness data in its mix.
- ``"sigmoid"``: ``sigmoid(r_safety)``, the paper's rule for a calibrated model (0.15 means
  ``r_safety < logit(0.15) = -1.73``).
- ``"raw"``: the raw score itself.

The selected score is then whitened with the statistics of the model it came from
(``LOGIT(sigmoid(r)) = r``, so whitening works on the raw score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from rewards.protocol import as_rewards
from rewards.whitening import RewardStats, sigmoid, whiten

if TYPE_CHECKING:
    import torch

LLAMA2_SAFETY_THRESHOLD = 0.15
ThresholdScale = Literal["sigmoid", "raw", "whitened"]


def llama2_uses_safety(tagged: bool, safety_value: float, threshold: float) -> bool:
    """Llama 2's rule: the safety score wins on safety-tagged prompts or when it is below the threshold."""
    return tagged or safety_value < threshold


def combine_scores(
    helpful: Sequence[float],
    safety: Sequence[float],
    is_safety: Sequence[bool] | None = None,
    *,
    threshold: float = LLAMA2_SAFETY_THRESHOLD,
    threshold_scale: ThresholdScale = "whitened",
    safety_stats: RewardStats | None = None,
    rule: Callable[[bool, float, float], bool] = llama2_uses_safety,
) -> tuple[list[float], list[bool]]:
    """Pick per sample the raw helpfulness or safety score -> (raw combined scores, used_safety flags).

    ``rule(tagged, safety_value, threshold) -> bool`` decides; ``safety_value`` is the safety score on
    ``threshold_scale``.
    """
    if len(helpful) != len(safety):
        raise ValueError(f"{len(helpful)} helpfulness scores but {len(safety)} safety scores")
    tags = [False] * len(helpful) if is_safety is None else list(is_safety)
    if len(tags) != len(helpful):
        raise ValueError(f"{len(tags)} safety tags for {len(helpful)} scores")
    _check_scale(threshold_scale, safety_stats)
    combined, used = [], []
    for h, s, tagged in zip(helpful, safety, tags, strict=True):
        use = rule(bool(tagged), _on_scale(float(s), threshold_scale, safety_stats), threshold)
        combined.append(float(s) if use else float(h))
        used.append(use)
    return combined, used


def _check_scale(scale: ThresholdScale, safety_stats: RewardStats | None) -> None:
    if scale == "whitened" and safety_stats is None:
        raise ValueError("threshold_scale='whitened' needs the safety model's stats (reward_stats.json, "
                         "written by align's reward_model stage); without them use threshold_scale='sigmoid'")


def _on_scale(raw: float, scale: ThresholdScale, stats: RewardStats | None) -> float:
    if scale == "sigmoid":
        return sigmoid(raw)
    if scale == "whitened":
        return sigmoid(whiten(raw, stats))
    return raw


@dataclass
class CombinedScores:
    reward: list[float]  # what PPO / rejection sampling use (whitened unless whiten=False)
    helpful: list[float]  # raw scores of each model
    safety: list[float]
    used_safety: list[bool]


class CombinedReward:
    """Score conversations with both models and combine them the Llama 2 way.

    ``helpful`` and ``safety`` are scorers (``rewards.scoring.RewardScorer`` or anything with
    ``score(prompts, responses, batch_size) -> list[float]`` and a ``stats`` attribute). Called, it is a
    :class:`rewards.protocol.RewardFunction` (the ``reward`` of :meth:`score`).
    """

    def __init__(
        self,
        helpful,
        safety,
        *,
        threshold: float = LLAMA2_SAFETY_THRESHOLD,
        threshold_scale: ThresholdScale = "whitened",
        whiten: bool = True,
        rule: Callable[[bool, float, float], bool] = llama2_uses_safety,
        batch_size: int = 8,
    ):
        self.helpful, self.safety, self.batch_size = helpful, safety, batch_size
        self.threshold, self.threshold_scale, self.rule = threshold, threshold_scale, rule
        self.whiten = whiten
        if whiten and (helpful.stats is None or safety.stats is None):
            raise ValueError("whiten=True needs reward_stats.json with both models (or pass whiten=False)")
        _check_scale(threshold_scale, safety.stats)  # now, not at the first score

    def __call__(self, prompts, responses, is_safety: Sequence[bool] | None = None) -> torch.Tensor:
        """(B,) float64: the combined reward of :meth:`score`."""
        return as_rewards(self.score(prompts, responses, is_safety).reward)

    def score(self, prompts, responses, is_safety: Sequence[bool] | None = None, batch_size: int | None = None):
        """-> :class:`CombinedScores`; ``is_safety[i]``: prompt i is tagged safety; ``batch_size``: rows
        per scoring batch (default: the one given at construction)."""
        batch_size = batch_size or self.batch_size
        h = self.helpful.score(prompts, responses, batch_size=batch_size)
        s = self.safety.score(prompts, responses, batch_size=batch_size)
        raw, used = combine_scores(
            h, s, is_safety, threshold=self.threshold, threshold_scale=self.threshold_scale,
            safety_stats=self.safety.stats, rule=self.rule,
        )
        if self.whiten:
            reward = [whiten(r, self.safety.stats if u else self.helpful.stats) for r, u in zip(raw, used, strict=True)]
        else:
            reward = raw
        return CombinedScores(reward=reward, helpful=h, safety=s, used_safety=used)
