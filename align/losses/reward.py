"""Reward model ranking loss over N >= 2 responses ranked best-first (Llama 2 eq. 2; Llama 3 sec. 4.1.2).

For one prompt with responses ranked ``y_1 > y_2 > ... > y_N`` and scalar scores ``r_k``::

    L = 1/|P| * sum_{(i, j) in P} [ -log sigmoid(r_i - r_j - m_ij) + c * (r_i + r_j)^2 ]

over the ordered pairs ``P = {(i, j) : i < j}`` (N(N-1)/2 of them), so every prompt weighs the same
whatever its number of responses; the batch loss is the mean (or sum) over prompts.

Margin ``m_ij``: a record carries one margin ``m`` (from its strength via a table of
:data:`MARGIN_TABLES`, or given; ``align.data.ranking.record_margin`` looks it up). A strength label
compares the record's preferred responses with its *rejected* one (the last), so ``m`` applies to every
pair whose worse response is the last one: for pairwise data that is the one pair; for Llama 3's
edited > chosen > rejected, (edited, rejected) and (chosen, rejected) get ``m`` (by transitivity the edit
beats the rejected response at least as clearly) and (edited, chosen), whose gap no label measures, gets 0.

Centering (Eisenstein et al. 2023, TRL's ``center_rewards_coefficient``): ``c * (r_i + r_j)^2`` per
pair, which for pairwise data is exactly TRL's ``c * mean((r_chosen + r_rejected)^2)``; it pins the
scores' free offset near 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

# Llama 2 (sec. 3.2.2, table 28): margin by preference strength; Llama 3 drops it ("none").
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "none": {},
    "llama2_small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
                     "negligibly_better": 0.0},
    "llama2_large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0,
                     "negligibly_better": 0.0},
}


def ranked_pairs(responses_per_prompt: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Index tensors over the ordered pairs of every prompt, responses numbered through the batch:
    better (M,), worse (M,), prompt (M,), takes_margin (M,) bool (the worse one is the prompt's last)."""
    better, worse, prompt, last = [], [], [], []
    offset = 0
    for p, n in enumerate(responses_per_prompt):
        if n < 2:
            raise ValueError(f"prompt {p} has {n} response(s); ranking needs at least 2")
        for i in range(n):
            for j in range(i + 1, n):
                better.append(offset + i)
                worse.append(offset + j)
                prompt.append(p)
                last.append(j == n - 1)
        offset += n
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return as_long(better), as_long(worse), as_long(prompt), torch.tensor(last, dtype=torch.bool)


def reward_ranking_loss(
    rewards: torch.Tensor,
    responses_per_prompt: Sequence[int],
    margins: torch.Tensor | None = None,
    centering_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The module's loss.

    rewards: (R,) scores of all responses of the batch, prompt after prompt, each prompt's best first.
    responses_per_prompt: (P,) how many responses each prompt has (sums to R).
    margins: (P,) one margin per prompt (None: no margin).
    reduction: "mean" over prompts, or "sum" (the training loop divides by the global prompt count).

    Returns (loss, metrics) where metrics are reduced like the loss: ``accuracy`` (per prompt, the
    fraction of its pairs ranked right), ``margin`` (score of the best minus the worst response),
    ``centering`` (the centering term, when ``centering_coef`` is set).
    """
    if int(sum(responses_per_prompt)) != rewards.shape[0]:
        raise ValueError(f"{rewards.shape[0]} rewards for {sum(responses_per_prompt)} responses")
    n_prompts = len(responses_per_prompt)
    better, worse, prompt, takes_margin = (t.to(rewards.device) for t in ranked_pairs(responses_per_prompt))
    r = rewards.float()
    diff = r[better] - r[worse]  # (M,)
    if margins is not None:
        diff = diff - margins.to(r)[prompt] * takes_margin
    pair_loss = -F.logsigmoid(diff)  # (M,)
    centering = (r[better] + r[worse]) ** 2 if centering_coef else None
    if centering is not None:
        pair_loss = pair_loss + centering_coef * centering
    pairs_per_prompt = torch.bincount(prompt, minlength=n_prompts).to(r)  # (P,)
    weight = 1.0 / pairs_per_prompt[prompt]  # (M,): each prompt's pairs average to one unit

    def reduce(per_pair: torch.Tensor) -> torch.Tensor:
        total = (per_pair * weight).sum()
        return total / n_prompts if reduction == "mean" else total

    loss = reduce(pair_loss)
    with torch.no_grad():
        counts = torch.as_tensor(list(responses_per_prompt), device=r.device)
        first = torch.cumsum(counts, 0) - counts  # (P,) index of each prompt's best response
        spread = r[first] - r[first + counts - 1]
        metrics = {
            "accuracy": float(reduce((r[better] > r[worse]).to(r))),
            "margin": float(spread.sum() / (n_prompts if reduction == "mean" else 1)),
        }
        if centering is not None:
            metrics["centering"] = float(reduce(centering))
    return loss, metrics
