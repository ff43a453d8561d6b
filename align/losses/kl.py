"""KL divergence of a policy p to its reference q, per token.

Exact, from the full next-token distributions (two log-softmax tensors over the vocabulary)::

    KL(p || q) = sum_v p(v) * (log p(v) - log q(v))

Estimators from the sampled token y ~ p alone (Schulman, "Approximating KL Divergence", 2020), what PPO's
per-token penalty uses since it keeps only the sampled tokens' log-probs. With the log-ratio
``r = log q(y) - log p(y)``:

- ``k1 = -r = logp - ref_logp``: unbiased (E_p[k1] = KL), but negative for some tokens, high variance;
- ``k3 = (exp(r) - 1) - r``: unbiased too (E_p[exp(r)] = 1), never negative (exp(r) >= 1 + r), lower
  variance when p and q are close.
"""

from __future__ import annotations

import torch


def exact_kl(logps: torch.Tensor, ref_logps: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """KL(p || q) from log-softmax tensors (..., V) of the policy and the reference -> (...).

    ``dim`` is the vocabulary dim; ``(-2, -1)`` also sums over the tokens of a (T, V) response in one
    reduction (the response's KL)."""
    return (logps.exp() * (logps - ref_logps)).sum(dim)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 per sampled token: (B, T) log-probs of the sampled tokens under the policy and the reference
    -> (B, T) ``logps - ref_logps``."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 per sampled token: (B, T), (B, T) -> (B, T) ``exp(r) - 1 - r`` with ``r = ref_logps - logps``.

    Written with ``expm1`` so that it stays >= 0 in floating point when p and q nearly agree (where
    ``exp(r) - 1 - r`` can round below 0)."""
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio
