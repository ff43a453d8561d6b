"""Log-probs computed only where they are needed.

The LM head (hidden -> vocabulary) is the most expensive matmul of a small-to-mid model's step and
its output the largest activation. Training objectives need the log-prob of the next token only at
response positions, so :class:`TokenLogps` runs the decoder over the whole sequence (its last layer at
the selected positions only: :mod:`align.models.last_layer`) but the head over the selected positions only (TRL's trainers run it over every position, prompt and padding included).

It is an ``nn.Module`` so that DDP/FSDP wrap it and its forward is the one that runs under them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from align.models.trunk import hidden_from


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and output projection of an HF causal LM (PEFT-wrapped or not)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.get_decoder(), base.get_output_embeddings()


def selected_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row: (N, V), (N,) -> (N,), computed in float32."""
    return _SelectedLogps.apply(logits, targets)


class _SelectedLogps(torch.autograd.Function):
    """Same value and gradient as ``gather - logsumexp``, with a backward that makes one (N, V) tensor
    (``grad * (onehot - softmax)``, in place) instead of autograd's five: less time and memory on the
    largest tensors of the step."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(_at_least_fp32(logits), dim=-1)  # (N,)
        ctx.save_for_backward(logits, lse, targets)
        return _at_least_fp32(logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad: (N,)
        logits, lse, targets = ctx.saved_tensors
        out = _at_least_fp32(logits) - lse.unsqueeze(-1)  # (N, V), a new tensor even for float32 logits
        out.exp_().mul_(-grad.unsqueeze(-1))
        out[torch.arange(out.shape[0], device=out.device), targets] += grad
        return out.to(logits.dtype), None


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class TokenLogps(nn.Module):
    """``forward(input_ids, position_ids, attention_mask, index, targets) -> (N,)`` log-probs.

    input_ids, position_ids: (B, T). attention_mask: None (padding-free packed rows, sequences told
    apart by position_ids restarting at 0), (B, T) padding mask, or a 4D (B, 1, T, T) custom mask.
    index: (N,) flat positions into B*T whose *next* token is scored; targets: (N,) those next tokens.
    """

    prune_last_layer = True  # the last decoder layer at the scored positions only (align.models.last_layer)

    def __init__(self, lm: nn.Module, trunk_layers: int = 0):
        super().__init__()
        self.lm = lm
        self.trunk_layers = trunk_layers  # what a ``trunk`` argument holds: the states after these layers

    def forward(self, input_ids, position_ids, attention_mask, index, targets, trunk=None):
        """``trunk``: (B, T, H) the hidden states after the first ``trunk_layers`` (frozen) decoder layers
        (:mod:`align.models.trunk`): only the layers above them run."""
        decoder, head = decoder_and_head(self.lm)
        selected = hidden_from(decoder, index, trunk, self.trunk_layers, prune=self.prune_last_layer,
                               input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        return selected_token_logps(head(selected), targets)  # (N,)
