"""The policy and the value model as one module (what PPO trains: DDP/FSDP wrap it, its forward is the one
that runs under them), and token log-probs from its outputs."""

from __future__ import annotations

import torch
from torch import nn

from align.models.inference import causal_only
from align.models.logps import decoder_and_head
from align.models.reward import backbone_and_head
from align.models.trunk import hidden_from


class PolicyAndValue(nn.Module):
    """``forward(input_ids, attention_mask) -> (logits (B, T, V), values (B, T))`` aligned with the tokens:
    position t holds what predicts token t (the logits and the value of the state before it); position 0,
    which nothing predicts, is 0.

    ``forward(input_ids, attention_mask, response_mask)``: only what predicts the response tokens (the
    mask's True entries, row-major): logits (N, V) in that order and values (B, T), 0 off the mask. The
    heads run at those positions only, and so does the last decoder layer of both models
    (:mod:`align.models.last_layer`)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.trunk_layers = 0  # lower decoder layers both share frozen, run once per rollout (PPO sets it)

    def forward(self, input_ids, attention_mask, response_mask=None, trunk=None):
        """``trunk``: (B, T, H) the hidden states after the first ``trunk_layers`` decoder layers, which
        policy and value model share frozen (:mod:`align.models.trunk`): only the layers above them run
        (with ``response_mask`` only)."""
        attention_mask = causal_only(attention_mask)  # right-padded rollouts: the causal kernel, no mask
        value_decoder, value_head = backbone_and_head(self.value_model)
        if response_mask is None:
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            hidden = value_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
            values = value_head(hidden).squeeze(-1).float()  # (B, T)
            return _shift(logits.float()), _shift(values)
        rows, cols = response_mask.nonzero(as_tuple=True)  # response tokens; position cols - 1 predicts each
        index = rows * input_ids.shape[1] + cols - 1
        decoder, head = decoder_and_head(self.policy)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        logits = head(hidden_from(decoder, index, trunk, self.trunk_layers, **inputs)).float()
        v = value_head(hidden_from(value_decoder, index, trunk, self.trunk_layers, **inputs))
        values = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        return logits, values.index_put((rows, cols), v.squeeze(-1).float())


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """(B, T) log-probs of the response tokens (0 elsewhere) from logits (N, V) at what predicts them (the
    response mask's True entries, row-major), divided by the temperature."""
    rows, cols = response_mask.nonzero(as_tuple=True)
    if temperature > 0:
        logits = logits / temperature
    picked = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[rows, cols, None]).squeeze(-1)
    return torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device).index_put((rows, cols), picked)


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Move what position t predicts to position t+1 (the token it predicts); position 0 gets 0."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T) log-probs of each token under ``logits`` (B, T, V, token-aligned) divided by the temperature."""
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[..., None]).squeeze(-1)
