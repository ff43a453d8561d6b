"""Which preference records a reward model trains on, before any token is made: the domain selection and
the hygiene of Llama 3 (sec. 4.2.3; :mod:`align.data.ranking` describes both). No torch, so recipe validation
runs the very functions the stage runs (:mod:`align.data.record_checks`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from data_schemas import STRENGTHS, PreferenceRecord


def select_domain(
    records: Sequence[PreferenceRecord], domain: str | None, default_domain: str | None
) -> list[PreferenceRecord]:
    """Records of ``domain`` (all when None); ``default_domain`` labels records whose row set none."""
    out = []
    for r in records:
        if default_domain is not None and "domain" not in r.model_fields_set:
            r = r.model_copy(update={"domain": default_domain})
        if domain is None or r.domain == domain:
            out.append(r)
    return out


def similarity(a: str, b: str) -> float:
    """Word-level difflib ratio in [0, 1] (1: same words in the same order)."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def apply_hygiene(
    records: Sequence[PreferenceRecord], min_strength: str | None, dedup_threshold: float | None
) -> tuple[list[PreferenceRecord], dict[str, float]]:
    """-> (kept records, counts: dropped_below_min_strength, dropped_near_duplicate_responses,
    dropped_near_duplicate_records)."""
    allowed = set(STRENGTHS[: STRENGTHS.index(min_strength) + 1]) if min_strength else None
    counts = {"dropped_below_min_strength": 0, "dropped_near_duplicate_responses": 0,
              "dropped_near_duplicate_records": 0}
    kept = []
    for r in records:
        if allowed is not None and r.strength is not None and r.strength not in allowed:
            counts["dropped_below_min_strength"] += 1
            continue
        if dedup_threshold is not None:
            responses = []
            for m in r.responses:
                if any(similarity(m.content, k.content) >= dedup_threshold for k in responses):
                    counts["dropped_near_duplicate_responses"] += 1
                else:
                    responses.append(m)
            if len(responses) < 2:
                counts["dropped_near_duplicate_records"] += 1
                continue
            if len(responses) < len(r.responses):
                r = r.model_copy(update={"responses": responses})
        kept.append(r)
    return kept, {k: float(v) for k, v in counts.items()}
