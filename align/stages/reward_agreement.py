"""How well a reward ranks one policy's own samples: over the candidate pairs of each prompt that a judge
separates by more than ``gap``, the share the reward orders as the judge does (a tie counts half). This is
the reward models' accuracy on the newest policy's answers, the number Llama 2 §3.2.1 watched drop as the
policy moved away from the data the reward models were trained on. Pure; no torch."""

from __future__ import annotations

from collections.abc import Sequence


def pair_agreement(reward: Sequence[Sequence[float]], judge: Sequence[Sequence[float]], safety: Sequence[bool],
                   gap: float = 0.0, prefix: str = "reward") -> dict[str, float]:
    """``reward[i][j]`` and ``judge[i][j]``: candidate j of prompt i; ``safety[i]``: prompt i is safety-tagged.
    -> ``<prefix>_accuracy`` (all pairs), ``<prefix>_accuracy/helpfulness`` and ``/safety`` (by the prompt's
    tag), ``<prefix>_pairs``; {} when no pair is separated."""
    credits: dict[str, list[float]] = {"helpfulness": [], "safety": []}
    for r, g, is_safety in zip(reward, judge, safety, strict=True):
        if len(r) != len(g):
            raise ValueError(f"{len(r)} rewards but {len(g)} judge scores for one prompt")
        mine = credits["safety" if is_safety else "helpfulness"]
        for a in range(len(r)):
            for b in range(a + 1, len(r)):
                if abs(g[a] - g[b]) > gap:
                    better, worse = (a, b) if g[a] > g[b] else (b, a)
                    mine.append(1.0 if r[better] > r[worse] else 0.5 if r[better] == r[worse] else 0.0)
    every = credits["helpfulness"] + credits["safety"]
    if not every:
        return {}
    out = {f"{prefix}_accuracy": sum(every) / len(every), f"{prefix}_pairs": float(len(every))}
    out.update({f"{prefix}_accuracy/{k}": sum(v) / len(v) for k, v in credits.items() if v})
    return out
