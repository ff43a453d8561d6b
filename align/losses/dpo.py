"""DPO the Llama 3 way: formatting tokens out of the log-prob sums, plus an NLL term on the chosen response.

For a pair (chosen c, rejected r) of one prompt x (Rafailov et al. 2023, eq. 7; Llama 3 sec. 4.1.4):

    h    = (log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x))
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) + nll_weight * NLL(c|x)

- ``log pi(y|x)`` sums the token log-probs of response y over its *scored* tokens: the formatting tokens
  (the termination token ``<|eot_id|>`` inside a response) are left out (``dpo_mask`` is False there).
- ``NLL(c|x)`` is the mean negative log-prob of ALL the chosen response's tokens, the termination token
  included, so the model keeps learning to stop.
- ``eps`` is label smoothing (conservative DPO, Mitchell 2023); 0 gives plain DPO.

Normalisation (what the training loop sees). :func:`dpo_loss` returns SUMS over pairs; the loop divides by
the global pair count of the optimizer step. So the NLL term is a per-pair token mean, then a mean over
pairs: ``mean_i( -sum_t logp_it / n_i )``. TRL's ``loss_type="sft"`` instead takes one token mean over all
chosen tokens of the (per-device) batch: ``-sum_i sum_t logp_it / sum_i n_i``, which weights long responses
more and depends on how the batch is split. The two are equal when every chosen response of the batch has
the same length (``tests/invariants/test_dpo_trl_parity.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_sums(
    token_logps: torch.Tensor, owner: torch.Tensor, num_responses: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum token log-probs per response: (N,), (N,) response index, optional (N,) bool -> (R,)."""
    values = token_logps if mask is None else token_logps * mask.to(token_logps.dtype)
    return values.new_zeros(num_responses).index_add(0, owner, values)


def response_token_counts(owner: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Tokens per response: (N,) response index -> (R,) float."""
    return torch.bincount(owner, minlength=num_responses).float()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    nll_weight: float = 0.2,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over pairs of the DPO (+ NLL) loss, and metric sums (divide both by the pair count).

    All inputs are (P,): masked log-prob sums of the policy and the reference for each pair's chosen and
    rejected response, and ``chosen_nll``, the per-pair token-mean NLL of the chosen response (needed when
    ``nll_weight > 0``). Metrics: ``rewards/chosen`` and ``rewards/rejected`` (beta x log-ratio),
    ``rewards/accuracy`` (chosen reward > rejected), ``rewards/margin``, ``dpo`` (the preference term),
    ``nll``, ``logps/chosen``, ``logps/rejected``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (P,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (P,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (P,)
    preference = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    loss = preference.sum()
    if nll_weight:
        if chosen_nll is None:
            raise ValueError("nll_weight > 0 needs chosen_nll")
        loss = loss + nll_weight * chosen_nll.sum()
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        metrics = {
            "dpo": preference.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen_logps.detach().sum(),
            "logps/rejected": policy_rejected_logps.detach().sum(),
        }
        if chosen_nll is not None:
            metrics["nll"] = chosen_nll.detach().sum()
    return loss, metrics
