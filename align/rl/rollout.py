"""One PPO rollout batch: what was sampled, what the models said about it, and what PPO derived from it.

Layout (modelled on OpenRLHF's ``Experience``): every per-token field is (B, T) and aligned with
``sequences``: position t holds what belongs to token ``sequences[:, t]`` (its log-prob given the tokens
before it, its reward, the value of the state it was sampled in). The row layout is the producer's to
choose, e.g. left-padded prompt | response | right padding as a batched ``generate`` returns it, or the
response part alone (then T is the response length); the math only reads ``response_mask``. Per-token
fields are 0 off the response.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Rollout:
    # what was sampled
    sequences: torch.Tensor  # (B, T) long: prompt + response token ids
    attention_mask: torch.Tensor  # (B, T) bool: True on real tokens (not padding)
    response_mask: torch.Tensor  # (B, T) bool: True on response tokens, termination token included
    # what the models said, at rollout time
    logps: torch.Tensor  # (B, T) log-probs of the sampled tokens under the rollout policy, 0 off the response
    ref_logps: torch.Tensor  # (B, T) the same under the reference, 0 off the response
    values: torch.Tensor  # (B, T) value-model estimates, 0 off the response
    scores: torch.Tensor  # (B,) sequence rewards (e.g. whitened RM scores)
    # what PPO derived (``align.rl.advantages.advantages_of``: KL-penalised rewards, then GAE)
    rewards: torch.Tensor | None = None  # (B, T) per-token rewards, 0 off the response
    advantages: torch.Tensor | None = None  # (B, T) (whitened or not: the stage's choice)
    returns: torch.Tensor | None = None  # (B, T) advantages + values before any whitening
    # the hidden states after the decoder layers policy, value model and reference share frozen
    # (align.models.trunk), so training steps run only the layers above them; None: the whole models run
    trunk: torch.Tensor | None = None  # (B, T, H)

    def __len__(self) -> int:
        return self.sequences.size(0)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what a training step processes."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device``."""
        return self._map(lambda x: x.to(device))

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rows ``index`` (a (k,) long tensor or a slice) of every field."""
        return self._map(lambda x: x[index])

    def trimmed(self) -> Rollout:
        """The same rows without the columns after the longest row's last real token (the layout is
        right-padded, so nothing before them changes): a minibatch of short rows computes no padding."""
        width = int(self.attention_mask.sum(dim=1).max()) if len(self) else 0
        if width >= self.sequences.size(1):
            return self
        return self._map(lambda x: x[:, :width] if x.dim() >= 2 else x)

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Rollout]:
        """Rollouts of ``size`` rows (the last may be smaller) covering every row once: in a random order
        drawn from ``generator`` (on the CPU), or in order when it is None."""
        if size < 1:
            raise ValueError(f"minibatch size must be >= 1, got {size}")
        n = len(self)
        order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
        order = order.to(self.sequences.device)
        for start in range(0, n, size):
            yield self.select(order[start : start + size])

    def _map(self, fn) -> Rollout:
        return replace(self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None})
