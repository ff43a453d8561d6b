"""The reward function a recipe's :class:`~align.config.reward.RewardSpec` describes, as a
:class:`rewards.protocol.RewardFunction` (prompts, responses, safety tags -> (B,) float64 tensor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from align import plugins
from align.checksums import verify_model_folder
from align.config.reward import RewardSpec
from align.config.specs import ModelSpec
from rewards.combine import CombinedReward
from rewards.protocol import RewardFunction, as_rewards
from rewards.scoring import ModelReward, RewardScorer

if TYPE_CHECKING:
    import torch


def build_reward(spec: RewardSpec, model_path: Callable[[ModelSpec], str]) -> RewardFunction:
    """Load the reward models ``spec`` names (``model_path`` resolves a spec to a folder or hub id,
    e.g. ``StageContext.model_path``) and wrap them; ``function`` (a plug-in's reward function by name, e.g.
    the built-in world's ``gold``, or a dotted path) loads no model."""
    if spec.function is not None:
        return plugins.load("reward", spec.function)
    if spec.model is not None:
        scorer = _scorer(model_path(spec.model))
        return ModelReward(scorer, whiten=spec.whiten, batch_size=spec.batch_size)
    return CombinedReward(
        _scorer(model_path(spec.helpful)),
        _scorer(model_path(spec.safety)),
        threshold=spec.safety_threshold, threshold_scale=spec.threshold_scale, whiten=spec.whiten,
        batch_size=spec.batch_size,
    )


def _scorer(path: str) -> RewardScorer:
    """A reward model's folder, verified against its manifest (:mod:`align.checksums`) first."""
    verify_model_folder(path)
    return RewardScorer.from_pretrained(path)


def score_and_count(reward: RewardFunction, prompts, responses, is_safety) -> tuple[torch.Tensor, int, int]:
    """-> (the reward's scores, samples of prompts not tagged safety, how many of those the Helpfulness +
    Safety combination scored with the safety model). A high share means the safety model's scores fall
    below the threshold on ordinary answers (see :mod:`rewards.combine`); 0, 0 for other rewards."""
    if not isinstance(reward, CombinedReward):
        return reward(prompts, responses, is_safety), 0, 0
    out = reward.score(prompts, responses, is_safety)
    untagged = [used for used, tagged in zip(out.used_safety, is_safety, strict=True) if not tagged]
    return as_rewards(out.reward), len(untagged), sum(untagged)
