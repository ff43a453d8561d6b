"""Per-token rewards, GAE and masked statistics for PPO, the Llama 2 way (pure functions on tensors).

All per-token tensors are (B, T) over one layout the caller chooses (e.g. the whole prompt + response row,
or the response part only); the functions only read ``response_mask`` (B, T) bool, True on the response
tokens, termination token included. Position t holds what belongs to the action ``token t``: its log-prob,
its reward, and the value of the state it was taken in.

Reward (Ziegler et al. 2019; Llama 2 sec. 3.2.3)::

    r_t = -kl_coef * KL_t                  on every response token   (KL_t = k1 or k3 of the sampled token)
    r_t += score                            on the LAST response token of the row

GAE (Schulman et al. 2016), over the response tokens of each row in order::

    delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last response token = 0)
    A_t     = delta_t + gamma * lam * A_{t+1}       returns R_t = A_t + V_t

Masked statistics use the population mean over the True entries; ``masked_var`` is unbiased (Bessel's
n / (n - 1)) by default, as TRL's PPO whitens with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from align.losses.kl import kl_k1, kl_k3

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (same shape): a scalar, or along ``dim``.

    Entries outside the mask are never read (NaN or inf there does not leak)."""
    total = torch.where(mask, x, 0).sum() if dim is None else torch.where(mask, x, 0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the True entries of ``mask``, a scalar.

    ``unbiased=True`` (the default, TRL's): sum of squared deviations / (n - 1), i.e. the biased variance
    times Bessel's correction n / (n - 1); needs n >= 2. ``unbiased=False``: / n."""
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased var), 0 outside the mask.

    ``shift_mean=False`` adds the mean back: only the scale changes (what TRL does for rewards).
    ``sum_over_processes(t) -> t`` sums a tensor over the processes of a distributed run: the mean and the
    variance are then those of the masked entries of every process (as if one process held them all)."""
    total = sum_over_processes or (lambda t: t)
    count_and_sum = total(torch.stack([mask.sum().to(x.dtype), torch.where(mask, x, 0).sum()]))
    n, mean = count_and_sum[0], count_and_sum[1] / count_and_sum[0]
    if int(n) < 2:
        raise ValueError(f"masked_whiten needs at least 2 masked entries (over all processes), got {int(n)}")
    var = total(torch.where(mask, (x - mean) ** 2, 0).sum()) / (n - 1)  # unbiased, as masked_var
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) long index of the last True of each row; every row needs one."""
    if not bool(mask.any(-1).all()):
        raise ValueError("every row needs at least one response token")
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(-1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and the per-token KL estimate, both (B, T) and 0 outside the mask.

    ``scores`` (B,) sequence rewards, added at the last response token of each row; ``logps``,
    ``ref_logps`` (B, T) log-probs of the sampled tokens under the rollout policy and the reference;
    ``estimator`` "k1" (``logps - ref_logps``) or "k3" (see ``align.losses.kl``)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    kl = torch.where(response_mask, KL_ESTIMATORS[estimator](logps, ref_logps), 0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_true_index(response_mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages (B, T), returns (B, T)), both 0 outside the mask.

    ``rewards``, ``values`` (B, T); ``response_mask`` (B, T) bool. Masked-out positions are skipped as if
    absent: prompt and padding contribute nothing, the state after the last response token has value 0,
    and a hole inside a response (if any) is bridged (the next value is that of the next response token).
    Advantages are not whitened: that is the caller's choice (``masked_whiten(advantages, response_mask)``).
    """
    rewards = torch.where(response_mask, rewards, 0)
    values = torch.where(response_mask, values, 0)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next response token (0 after the last)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        on = response_mask[:, t]
        advantages[:, t] = torch.where(on, advantage, 0)
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    returns = torch.where(response_mask, advantages + values, 0)
    return advantages, returns


def advantages_of(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor,
                  response_mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0,
                  lam: float = 0.95, whiten: bool = True, process_sum=None) -> tuple[torch.Tensor, ...]:
    """A rollout's arithmetic once the models have spoken -> (rewards, kl, advantages, returns), each
    (B, T): KL-penalised per-token rewards (:func:`kl_penalized_rewards`), GAE (:func:`gae`), advantages
    whitened over every process's tokens (``process_sum``, see :func:`masked_whiten`) when ``whiten``."""
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, response_mask, kl_coef, kl_estimator)
    advantages, returns = gae(rewards, values, response_mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, response_mask, sum_over_processes=process_sum)
    return rewards, kl, advantages, returns
