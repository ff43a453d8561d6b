"""Reward model accuracy from scores (pure; no model, no torch).

Llama 2 (table 8) reports preference accuracy per strength level; we add per-domain accuracy,
the mean margin and, for records with 3+ ranked responses, top-1 accuracy. Input: for each record
the scores of its responses in ranked order (best first), its strength (or None) and its domain.

- ``rm_accuracy``: over every ordered pair (i better than j, i < j) of every record, the fraction
  with ``score_i > score_j`` (a tie counts one half);
- ``rm_accuracy/<strength>``, ``rm_accuracy/domain=<domain>``: the same over those records' pairs;
- ``rm_accuracy/adjacent``: adjacent pairs only (best > middle, middle > worst; equals rm_accuracy
  for pairwise data);
- ``rm_top1_accuracy``: records whose best response gets the highest score (ties count 1/k);
- ``rm_mean_margin``: mean of ``score(best) - score(worst)`` over records (``r_chosen - r_rejected``).

:func:`length_baseline_accuracy` is the same pairwise accuracy for a "reward model" that scores a response
by its length in characters: the bar a trained reward model has to clear on data where the preferred
answer is usually the longer one (on the shared prefs_helpful data, 69% of chosen responses are longer);
:func:`length_baseline` gives it by strength too. :func:`by_length_order` splits a model's accuracy into the
pairs whose preferred response is the shorter one (where the length baseline scores 0: what was learned
beyond length shows there) and the longer one.
"""

from __future__ import annotations

from collections.abc import Sequence


def _pair_credit(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def ranking_accuracy(
    scores: Sequence[Sequence[float]],
    strengths: Sequence[str | None] | None = None,
    domains: Sequence[str] | None = None,
    prefix: str = "rm_",
) -> dict[str, float]:
    """Flat metrics (see the module docstring) for ranked ``scores``, one list per record."""
    n = len(scores)
    strengths = list(strengths) if strengths is not None else [None] * n
    domains = list(domains) if domains is not None else [None] * n
    if not (len(strengths) == len(domains) == n):
        raise ValueError("scores, strengths and domains must have one entry per record")
    if n == 0:
        return {f"{prefix}num_records": 0.0}
    groups: dict[str, list[float]] = {"": [], "adjacent": []}
    top1, margins = [], []
    for rec, strength, domain in zip(scores, strengths, domains, strict=True):
        if len(rec) < 2:
            raise ValueError("every record needs at least 2 scored responses")
        credits = [_pair_credit(rec[i], rec[j]) for i in range(len(rec)) for j in range(i + 1, len(rec))]
        groups[""] += credits
        groups["adjacent"] += [_pair_credit(rec[i], rec[i + 1]) for i in range(len(rec) - 1)]
        if strength is not None:
            groups.setdefault(strength, []).extend(credits)
        if domain is not None:
            groups.setdefault(f"domain={domain}", []).extend(credits)
        best = max(rec)
        top1.append(1.0 / sum(s == best for s in rec) if rec[0] == best else 0.0)
        margins.append(rec[0] - rec[-1])
    out = {f"{prefix}accuracy": _mean(groups.pop(""))}
    for key in sorted(groups):
        out[f"{prefix}accuracy/{key}"] = _mean(groups[key])
    out[f"{prefix}top1_accuracy"] = _mean(top1)
    out[f"{prefix}mean_margin"] = _mean(margins)
    out[f"{prefix}num_records"] = float(n)
    out[f"{prefix}num_pairs"] = float(sum(len(r) * (len(r) - 1) // 2 for r in scores))
    return out


def length_baseline_accuracy(records) -> float:
    """``rm_accuracy`` of scoring each response by its length in characters (ties count one half), for
    records with ranked ``responses`` (best first) of messages with ``content``."""
    lengths = [[float(len(m.content)) for m in r.responses] for r in records]
    return ranking_accuracy(lengths)["rm_accuracy"] if lengths else float("nan")


def length_baseline(records, strengths: Sequence[str | None] | None = None) -> dict[str, float]:
    """:func:`ranking_accuracy` of the length scorer, keys ``rm_length_baseline_accuracy`` and
    ``rm_length_baseline_accuracy/<strength>`` (Llama 2 table 8's rows for the baseline)."""
    lengths = [[float(len(m.content)) for m in r.responses] for r in records]
    out = ranking_accuracy(lengths, strengths, prefix="rm_length_baseline_") if lengths else {}
    return {k: v for k, v in out.items() if k.startswith("rm_length_baseline_accuracy")}


def by_length_order(scores: Sequence[Sequence[float]], records, prefix: str = "rm_") -> dict[str, float]:
    """Accuracy over the ordered pairs (i better than j) whose better response is shorter in characters
    (``<prefix>accuracy/shorter_wins``) and longer (``.../longer_wins``), with their pair counts
    (``<prefix>pairs/...``); pairs of equal length are in neither."""
    groups: dict[str, list[float]] = {"shorter_wins": [], "longer_wins": []}
    for rec, record in zip(scores, records, strict=True):
        lengths = [len(m.content) for m in record.responses]
        for i in range(len(rec)):
            for j in range(i + 1, len(rec)):
                if lengths[i] != lengths[j]:
                    key = "shorter_wins" if lengths[i] < lengths[j] else "longer_wins"
                    groups[key].append(_pair_credit(rec[i], rec[j]))
    out = {f"{prefix}pairs/{key}": float(len(credits)) for key, credits in groups.items()}
    out.update({f"{prefix}accuracy/{key}": _mean(credits) for key, credits in groups.items() if credits})
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
