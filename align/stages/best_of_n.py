"""Best-of-N: the sampling baseline of every reward-KL plot. For each N, each prompt's answer is the reward's
pick among its first N samples (in the order drawn), judged by the evaluators; its KL to the sampling policy
is analytic, log N - (N - 1) / N (Stiennon et al. 2020, appendix; Hilton's bound is an upper one, and this
is the value the DPO and Llama papers plot)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from align.evaluators import Evaluator, evaluate_all


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats: log n - (n - 1) / n (0 for n = 1)."""
    return math.log(n) - (n - 1) / n


def pick_first_n(samples: Sequence[Sequence[str]], scores: Sequence[dict[str, float]], n: int) -> list[str | None]:
    """Prompt i's highest-scored sample among its first ``n`` (``scores[i]``: sample text -> reward; samples
    without a score, e.g. blank ones, are passed over; the first of equal scores wins; None: no scored one)."""
    picks = []
    for texts, score in zip(samples, scores, strict=True):
        scored = [t for t in texts[:n] if t in score]
        picks.append(max(scored, key=lambda t: score[t]) if scored else None)
    return picks


def best_of_n_metrics(evaluators: Sequence[Evaluator], prompts: Sequence, samples: Sequence[Sequence[str]],
                      scores: Sequence[dict[str, float]], ns: Sequence[int]) -> dict[str, float]:
    """For each N of ``ns``: ``best_of_<N>/<metric>`` of the evaluators on the picks, ``best_of_<N>/kl``
    (analytic) and ``best_of_<N>/prompts`` (prompts with a pick)."""
    out: dict[str, float] = {}
    for n in ns:
        chosen = [(p, a) for p, a in zip(prompts, pick_first_n(samples, scores, n), strict=True) if a is not None]
        metrics = evaluate_all(evaluators, [p for p, _ in chosen], [a for _, a in chosen])
        out.update({f"best_of_{n}/{k}": v for k, v in metrics.items()})
        out[f"best_of_{n}/kl"] = best_of_n_kl(n)
        out[f"best_of_{n}/prompts"] = float(len(chosen))
    return out
