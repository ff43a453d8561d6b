"""Log-probs computed only where they are needed.

The LM head (hidden -> vocabulary) is the most expensive matmul of a small-to-mid model's step and
its output the largest activation. Training objectives need the log-prob of the next token only at
response positions, so :class:`TokenLogps` runs the decoder over the whole sequence but the head over
the selected positions only (TRL's trainers run it over every position, prompt and padding included).

It is an ``nn.Module`` so that DDP/FSDP wrap it and its forward is the one that runs under them.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and output projection of an HF causal LM (PEFT-wrapped or not)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.get_decoder(), base.get_output_embeddings()


def selected_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row: (N, V), (N,) -> (N,), computed in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class TokenLogps(nn.Module):
    """``forward(input_ids, position_ids, attention_mask, index, targets) -> (N,)`` log-probs.

    input_ids, position_ids: (B, T). attention_mask: None (padding-free packed rows, sequences told
    apart by position_ids restarting at 0), (B, T) padding mask, or a 4D (B, 1, T, T) custom mask.
    index: (N,) flat positions into B*T whose *next* token is scored; targets: (N,) those next tokens.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, index, targets):
        decoder, head = decoder_and_head(self.lm)
        hidden = decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
        return selected_token_logps(head(selected), targets)
