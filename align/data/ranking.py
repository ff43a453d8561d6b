"""Ranked preference records for the reward model: domain selection, data hygiene, margins, and one
shared-prompt row per record (the prompt once, then every ranked response; see ``shared_prompt``).

Token ids come from :func:`align.data.encode.encode_preference` (DPO's encoder too) with the reward model's
truncation (``"keep_final"``: ``rewards.encoding``'s rule, the one ``rewards.scoring.RewardScorer`` scores
with), so a response's ids in its packed row are exactly those of a row of its own.

The held-out split is by prompt (:func:`align.data.sources.split_by_prompt`).

Hygiene (Llama 3, sec. 4.2.3; :mod:`align.data.hygiene`, no torch), applied to the training split only
(held-out metrics cover every level):

- ``min_strength``: drop records labelled below that level; records with no strength label are kept;
- ``dedup_threshold``: a response whose word-level ``difflib`` similarity to a better-ranked response of
  the same record is at least the threshold is dropped (near-identical answers carry no preference);
  a record left with fewer than 2 responses is dropped.

Identical responses (:func:`tokenize_ranked_records`, both splits): a response whose ids (tokenized and
truncated, as the model sees them) equal those of a better-ranked response of the same record is dropped,
so only the pairs between identical responses go (they carry no preference, and tie in the held-out
accuracy); a record left with fewer than 2 responses is dropped. Truncated prompts and responses, and
responses tokenized apart from their prompt (``boundary_adjusted``), are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from align.data.collate import MovesToDevice
from align.data.encode import EncodeCounts, encode_preference
from align.data.hygiene import apply_hygiene, select_domain, similarity  # noqa: F401 (their home before)
from align.data.shared_prompt import SharedPromptBatch, SharedPromptRow, build_row, collate_shared
from align.losses.reward import MARGIN_TABLES
from data_schemas import DataError, PreferenceRecord

MarginSpec = str | dict[str, float]  # a MARGIN_TABLES name, "column", or strength -> margin


def record_margin(record: PreferenceRecord, margin: MarginSpec) -> float:
    """The record's margin: from its strength through a table (0 for a record with no strength), or
    its own ``margin`` (``"column"``: TRL's margin column, kept in ``meta["margin"]``)."""
    if margin == "column":
        if "margin" not in record.meta:
            raise DataError("missing (the stage's margin: column needs one on every record)", field="margin")
        return float(record.meta["margin"])
    table = MARGIN_TABLES[margin] if isinstance(margin, str) else margin
    return float(table.get(record.strength, 0.0)) if record.strength is not None else 0.0


@dataclass(frozen=True)
class RankedExample:
    row: SharedPromptRow  # prompt once, then every response (best first)
    margin: float
    strength: str | None
    domain: str

    def __len__(self) -> int:
        return len(self.row.input_ids)

    @property
    def num_responses(self) -> int:
        return len(self.row.spans)


def _encode(tokenizer, record: PreferenceRecord, max_length: int | None,
            max_prompt_length: int | None) -> tuple[list[int], list[list[int]], EncodeCounts]:
    """-> (prompt ids, response ids) truncated, and what was counted."""
    encoded, counts = encode_preference(tokenizer, record, max_length=max_length, truncation="keep_final",
                                        max_prompt_length=max_prompt_length)
    return encoded.prompt_ids, encoded.responses, counts


def tokenize_ranked(
    tokenizer, record: PreferenceRecord, max_length: int | None, max_prompt_length: int | None, margin: MarginSpec
) -> RankedExample:
    prompt_ids, responses, _ = _encode(tokenizer, record, max_length, max_prompt_length)
    return RankedExample(build_row(prompt_ids, responses), record_margin(record, margin), record.strength,
                         record.domain)


@dataclass
class RankedData:
    examples: list[RankedExample] = field(default_factory=list)
    records: list[PreferenceRecord] = field(default_factory=list)  # of ``examples``, identical copies removed
    identical_pairs: int = 0  # pairs of identical responses (dropped)
    identical_records: int = 0  # records left with fewer than 2 distinct responses (dropped)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    boundary_adjusted: int = 0  # responses tokenized apart from their prompt (merged at the boundary)

    @property
    def num_pairs(self) -> int:
        return sum(ex.num_responses * (ex.num_responses - 1) // 2 for ex in self.examples)


def tokenize_ranked_records(
    tokenizer, records: Sequence[PreferenceRecord], max_length: int | None, max_prompt_length: int | None,
    margin: MarginSpec,
) -> RankedData:
    """Tokenize ``records`` (:func:`tokenize_ranked`), dropping identical responses (module docstring)."""
    data = RankedData()
    for record in records:
        prompt_ids, responses, counts = _encode(tokenizer, record, max_length, max_prompt_length)
        data.truncated_prompts += counts.truncated_prompts
        data.truncated_responses += counts.truncated_responses
        data.boundary_adjusted += counts.boundary_adjusted
        keep = []
        for k, ids in enumerate(responses):
            same = sum(ids == responses[j] for j in range(k))
            data.identical_pairs += same
            if not same:
                keep.append(k)
        if len(keep) < 2:
            data.identical_records += 1
            continue
        if len(keep) < len(responses):
            record = record.model_copy(update={"responses": [record.responses[k] for k in keep]})
        data.records.append(record)
        data.examples.append(RankedExample(build_row(prompt_ids, [responses[k] for k in keep]),
                                           record_margin(record, margin), record.strength, record.domain))
    return data


@dataclass
class RankedBatch(MovesToDevice):
    rows: SharedPromptBatch  # one row per prompt; responses numbered 0..R-1 over the batch
    margins: torch.Tensor  # (P,) one margin per prompt

    @property
    def responses_per_prompt(self) -> list[int]:
        return self.rows.responses_per_row

    @property
    def num_prompts(self) -> int:
        return len(self.rows.responses_per_row)

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    @property
    def padded_tokens(self) -> int:
        """Token slots of the batch, padding included."""
        return int(self.rows.input_ids.numel())

    def model_inputs(self) -> tuple:
        r = self.rows
        inputs = (r.input_ids, r.position_ids, r.attention_mask, r.last_index)
        return inputs if r.trunk is None else (*inputs, r.trunk)


def collate_ranked(examples: Sequence[RankedExample], pad_id: int, dtype=torch.float32,
                   trunks: Sequence[torch.Tensor] | None = None) -> RankedBatch:
    """The batch of ``examples``; ``trunks[i]``: example i's states after the frozen lower layers."""
    rows = collate_shared([ex.row for ex in examples], pad_id, dtype, trunks=trunks)
    return RankedBatch(rows, torch.tensor([ex.margin for ex in examples], dtype=torch.float32))


def write_scored_records(path, records, scores) -> None:
    """``records`` (prompt, responses, strength, domain) with their ``scores``, one JSON line each."""
    import json

    with path.open("w") as f:
        for record, s in zip(records, scores, strict=True):
            row = record.model_dump(mode="json", include={"prompt", "responses", "strength", "domain"})
            f.write(json.dumps({**row, "scores": s}) + "\n")


def encoding_counts(data: Sequence[RankedData]) -> dict[str, float]:
    """What tokenizing the splits ``data`` dropped, cut or adjusted, summed over the splits."""
    keys = ("identical_pairs", "boundary_adjusted", "truncated_prompts", "truncated_responses")
    counts = {k: float(sum(getattr(d, k) for d in data)) for k in keys}
    return {"identical_pairs_dropped": counts.pop("identical_pairs"), **counts}


def encoding_notes(data: Sequence[RankedData], records: Sequence[PreferenceRecord], sources: str) -> list[str]:
    """The stage log's lines about responses split at the prompt boundary and identical pairs dropped."""
    counts = encoding_counts(data)
    boundary, identical = int(counts["boundary_adjusted"]), int(counts["identical_pairs_dropped"])
    notes = [f"{boundary} responses merge with the prompt's last token when tokenized together (e.g. leading "
             "spaces after ChatML's header): split at the text boundary"] if boundary else []
    if identical:
        all_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in records)
        notes.append(f"warning: dropped {identical} of {all_pairs} ranked pairs whose two responses are identical "
                     f"(once tokenized and truncated; no preference to learn; the worse-ranked copy goes) in {sources}")
    return notes
