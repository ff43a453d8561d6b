"""PPO's clipped policy and value losses (Schulman et al. 2017) and the entropy of a softmax.

Per response token t, with ``ratio_t = exp(logps_t - old_logps_t)`` and advantage ``A_t``::

    policy: max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    value:  0.5 * max((v_t - R_t)^2, (clip(v_t, v_old_t - c, v_old_t + c) - R_t)^2)

Normalisation (what the training loop sees): both losses are SUMS over the masked tokens, and so are their
metrics; the loop divides by the global response-token count of the optimizer step, which makes the loss a
token mean over the whole step (the same gradient however the step is split into micro-batches and
processes). TRL's PPO takes ``masked_mean`` per micro-batch instead: equal when a step is one micro-batch.
Entries outside ``response_mask`` are never read, so they may hold anything (NaN included).
"""

from __future__ import annotations

import torch


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate summed over the masked tokens, and metric sums.

    ``logps`` (B, T) current log-probs of the taken tokens (with grad), ``old_logps`` (B, T) the rollout's,
    ``advantages`` (B, T), ``response_mask`` (B, T) bool. Metrics (sums over masked tokens, no grad):
    ``clipfrac`` tokens where the clipped branch is the larger (strictly, as TRL), ``approx_kl``
    ``0.5 * (logps - old_logps)^2``, ``ratio``."""
    log_ratio = torch.where(response_mask, logps - old_logps, 0)  # (B, T), 0 off the mask: no inf
    ratio = log_ratio.exp()  # (B, T)
    advantages = torch.where(response_mask, advantages, 0)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)  # (B, T)
    loss = torch.where(response_mask, torch.maximum(unclipped, clipped), 0).sum()
    with torch.no_grad():
        acc = torch.promote_types(ratio.dtype, torch.float32)  # sums of many bf16 terms lose counts
        metrics = {
            "clipfrac": (response_mask & (clipped > unclipped)).sum().to(acc),
            "approx_kl": (0.5 * log_ratio.detach().to(acc) ** 2).sum(),  # 0 off the mask
            "ratio": torch.where(response_mask, ratio.detach().to(acc), 0).sum(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss summed over the masked tokens, and metric sums.

    ``values`` (B, T) current predictions (with grad), ``old_values`` (B, T) the rollout's, ``returns``
    (B, T), ``response_mask`` (B, T) bool; ``clip=None`` gives the plain ``0.5 * (v - R)^2``. Metric
    ``vf_clipfrac``: tokens where the clipped error is strictly the larger."""
    values = torch.where(response_mask, values, 0)
    returns = torch.where(response_mask, returns, 0)
    unclipped = (values - returns) ** 2  # (B, T)
    if clip is None:
        clipped = unclipped
    else:
        old_values = torch.where(response_mask, old_values, 0)
        clipped = (torch.clamp(values, old_values - clip, old_values + clip) - returns) ** 2  # (B, T)
    loss = 0.5 * torch.where(response_mask, torch.maximum(unclipped, clipped), 0).sum()
    with torch.no_grad():
        acc = torch.promote_types(unclipped.dtype, torch.float32)
        metrics = {"vf_clipfrac": (response_mask & (clipped > unclipped)).sum().to(acc)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the vocabulary: (B, T, V) -> (B, T).

    ``-sum_v p_v log p_v`` from ``log_softmax`` (stable for large logits); ``-inf`` logits (tokens filtered
    out) count 0 instead of ``0 * -inf = NaN``. Computed in the logits' dtype: upcast first if needed."""
    logps = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    probs = logps.exp()  # (B, T, V), 0 where the logit is -inf
    return -(probs * logps.masked_fill(torch.isneginf(logps), 0)).sum(-1)
