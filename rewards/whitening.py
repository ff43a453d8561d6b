"""Whitening of reward scores (Llama 2, sec. 3.2.3): ``WHITEN(LOGIT(R))``.

Scale: our reward models output the raw linear score ``r`` (a logit). Llama 2 writes its rewards ``R`` on
the sigmoid scale, ``R = sigmoid(r)``, and whitens ``logit(R)``, which is ``r`` again. So whitening
here is ``(r - mean) / std``, with mean and std of the raw scores kept with the model in
``reward_stats.json`` (written by align's reward_model stage from the scores of its training and
held-out responses). :func:`whiten_probability` takes sigmoid-scale scores.

Works on floats, lists of floats and torch tensors alike (PPO whitens tensors).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATS_FILE = "reward_stats.json"


@dataclass(frozen=True)
class RewardStats:
    """Mean and standard deviation of a reward model's raw scores, and how it tokenises."""

    mean: float
    std: float
    count: int
    max_length: int | None = None  # truncation the model was trained with (see rewards.encoding)
    max_prompt_length: int | None = None
    extra: dict = field(default_factory=dict)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / STATS_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> RewardStats | None:
        """The stats saved with a model, or None when the folder has none."""
        path = Path(model_dir) / STATS_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def compute_stats(scores, **kwargs) -> RewardStats:
    """Mean and (population) standard deviation of raw scores."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("no scores to compute reward statistics from")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return RewardStats(mean=mean, std=std, count=len(values), **kwargs)


def logit(p, eps: float = 1e-6):
    """Inverse of the sigmoid, with ``p`` clamped to [eps, 1 - eps]."""
    if isinstance(p, (int, float)):
        p = min(max(float(p), eps), 1 - eps)
        return math.log(p / (1 - p))
    if isinstance(p, list):
        return [logit(x, eps) for x in p]
    p = p.clamp(eps, 1 - eps)
    return (p / (1 - p)).log()


def sigmoid(x):
    if isinstance(x, (int, float)):
        return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
    if isinstance(x, list):
        return [sigmoid(v) for v in x]
    return x.sigmoid()


def whiten(scores, stats: RewardStats, eps: float = 1e-8):
    """Raw (logit-scale) scores -> ``(r - mean) / std``."""
    if isinstance(scores, list):
        return [whiten(s, stats, eps) for s in scores]
    return (scores - stats.mean) / (stats.std + eps)


def whiten_probability(p, stats: RewardStats, eps: float = 1e-8):
    """Sigmoid-scale scores ``R`` -> ``WHITEN(LOGIT(R))`` (Llama 2's formula)."""
    return whiten(logit(p), stats, eps)
