"""The reward interface that rejection sampling and PPO share: a batch of conversations -> a tensor.

    scores = reward(prompts, responses, is_safety)   # (B,) float64

``prompts[i]`` is a list of messages (dicts or ``data_schemas.Message``) ending with a user turn,
``responses[i]`` the answer's text, ``is_safety[i]`` whether prompt i is tagged safety (only the Llama 2
combination reads it). Implementations: :class:`rewards.scoring.ModelReward` (one reward model),
:class:`rewards.combine.CombinedReward` (Helpfulness + Safety), :class:`PerSampleReward` around a
programmatic function (:func:`world.judge.gold_reward`, the built-in world's judge).

The tensor is float64 so that it holds exactly the Python floats the scorers compute (rejection sampling
writes them into its records); PPO casts it to its own dtype. torch is imported lazily, as everywhere in
``rewards``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class RewardFunction(Protocol):
    def __call__(
        self, prompts: Sequence[Sequence[Any]], responses: Sequence[str], is_safety: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """(B,) float64: the reward of ``responses[i]`` to ``prompts[i]`` (``is_safety`` None: no tags)."""
        ...


def as_rewards(values: Sequence[float]) -> torch.Tensor:
    """Python floats -> (B,) float64 tensor, value for value."""
    import torch

    return torch.tensor([float(v) for v in values], dtype=torch.float64)


class PerSampleReward:
    """A programmatic reward: ``fn(prompt_messages, response_text) -> float``, called once per sample."""

    def __init__(self, fn: Callable[[Sequence[Any], str], float]):
        self.fn = fn

    def __call__(self, prompts, responses, is_safety=None) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return as_rewards([self.fn(p, r) for p, r in zip(prompts, responses, strict=True)])
