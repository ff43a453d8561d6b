"""Preference records -> one shared-prompt row per record, with the DPO mask and the pairs to score.

A record's prompt is tokenized once and its responses follow it in one row (``align.data.shared_prompt``:
exact block mask, position ids restarting after the prompt). Which responses and which (chosen, rejected)
pairs: ``best_worst`` keeps the first and last of the ranked list (one pair); ``adjacent`` keeps all of
them and scores every neighbouring pair (K-1 pairs, K responses computed once).

The DPO mask (True = the token counts in the DPO log-prob sums) is positional: a response token is left
out iff the chat template emitted it (it is not inside the response's content span in the rendered text)
AND its id is in the formatting-token set. With the Llama 3 template that is exactly the response's
``<|eot_id|>``; a content token with the same id is never masked. If a template rewrites the content so
that it cannot be found verbatim in the rendered text, the whole response is treated as template text
and the mask falls back to the ids alone (counted in ``PreferenceData.id_fallbacks``).

Hygiene, counted in :class:`PreferenceData`: a pair whose two responses have the same token ids (as the
model sees them: tokenized and cut to ``max_length``) carries no preference (its DPO loss is log 2 whatever
the weights), so it is dropped (``identical_pairs``); a record left with no pair is dropped with it.
Responses cut at ``max_length`` are counted (``truncated``); responses the tokenizer would merge with the
end of the prompt are tokenized from the text boundary (``boundary_adjusted``). Token ids, the template masks
and those counts come from :func:`align.data.encode.encode_preference` (the reward model's encoder too), with
DPO's truncation (``"cut_end"``: the prompt is kept whole, responses lose their end).

:func:`load_preferences` (in :mod:`align.data.sources`, no torch) returns every record; the stages split them with
:func:`align.data.sources.split_by_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from align.data.collate import MovesToDevice
from align.data.encode import encode_preference
from align.data.shared_prompt import SharedPromptBatch, build_row, collate_shared
from align.data.sources import load_preferences  # noqa: F401 (its home before; no torch there)
from data_schemas import PreferenceRecord

PairsMode = Literal["best_worst", "adjacent"]


@dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]
    responses: list[list[int]]  # token ids of each kept response (content + termination token)
    dpo_masks: list[list[bool]]  # per response: True where the token counts in the DPO log-prob sums
    pairs: list[tuple[int, int]]  # (chosen, rejected) indices into ``responses``
    truncated: int = field(default=0, compare=False)  # responses cut at max_length

    def __len__(self) -> int:
        """Tokens of its shared-prompt row: the prompt once, then every response (as ``RankedExample``)."""
        return len(self.prompt_ids) + sum(map(len, self.responses))


@dataclass
class PreferenceData:
    examples: list[PreferenceExample] = field(default_factory=list)
    dropped: int = 0  # records whose prompt alone fills max_length
    id_fallbacks: int = 0  # responses whose content span was not found (id-only masking)
    truncated: int = 0  # responses cut at max_length (in the records kept)
    identical_pairs: int = 0  # pairs whose two responses have the same ids (dropped: no signal)
    identical_records: int = 0  # records dropped because every pair of theirs was identical
    boundary_adjusted: int = 0  # responses tokenized apart from their prompt (merged at the boundary)

    @property
    def num_pairs(self) -> int:
        return sum(len(ex.pairs) for ex in self.examples)


def select_pairs(num_responses: int, mode: PairsMode) -> tuple[list[int], list[tuple[int, int]]]:
    """Ranked responses -> (indices of the responses kept, pairs as indices into the kept list)."""
    if mode == "best_worst":
        return [0, num_responses - 1], [(0, 1)]
    if mode == "adjacent":
        return list(range(num_responses)), [(i, i + 1) for i in range(num_responses - 1)]
    raise ValueError(f"unknown pairs mode {mode!r}")


def tokenize_preference(
    tokenizer, record: PreferenceRecord, formatting_ids: frozenset[int], max_length: int, pairs: PairsMode,
) -> tuple[PreferenceExample | None, int, int]:
    """-> (example or None when the prompt alone fills ``max_length``, id-only fallbacks, responses split
    at the text boundary), both counted over the responses ``pairs`` keeps.

    Each prompt + response is cut to ``max_length`` tokens (the response's end is dropped)."""
    keep, pair_idx = select_pairs(len(record.responses), pairs)
    encoded, counts = encode_preference(tokenizer, record, keep=keep, max_length=max_length,
                                        truncation="cut_end", template_masks=True)
    if encoded is None:
        return None, counts.mask_id_fallbacks, counts.boundary_adjusted
    masks = [[not (t and i in formatting_ids) for i, t in zip(ids, template, strict=True)]
             for ids, template in zip(encoded.responses, encoded.template_masks, strict=True)]
    example = PreferenceExample(encoded.prompt_ids, encoded.responses, masks, pair_idx,
                                counts.truncated_responses)
    return example, counts.mask_id_fallbacks, counts.boundary_adjusted


def drop_identical_pairs(example: PreferenceExample) -> tuple[PreferenceExample | None, int]:
    """-> (the example without its pairs of identical responses (None when no pair is left), how many
    pairs were dropped). Responses no kept pair uses are dropped too."""
    pairs = [(c, r) for c, r in example.pairs if example.responses[c] != example.responses[r]]
    dropped = len(example.pairs) - len(pairs)
    if not dropped:
        return example, 0
    if not pairs:
        return None, dropped
    used = sorted({i for pair in pairs for i in pair})
    new = {old: k for k, old in enumerate(used)}
    return PreferenceExample(
        example.prompt_ids, [example.responses[i] for i in used], [example.dpo_masks[i] for i in used],
        [(new[c], new[r]) for c, r in pairs], example.truncated,
    ), dropped


def tokenize_preferences(tokenizer, records, formatting_ids, max_length, pairs) -> PreferenceData:
    data = PreferenceData()
    for record in records:
        example, fallbacks, splits = tokenize_preference(tokenizer, record, formatting_ids, max_length, pairs)
        data.id_fallbacks += fallbacks
        data.boundary_adjusted += splits
        if example is None:
            data.dropped += 1
            continue
        data.truncated += example.truncated
        example, identical = drop_identical_pairs(example)
        data.identical_pairs += identical
        if example is None:
            data.identical_records += 1
        else:
            data.examples.append(example)
    return data


@dataclass
class PairBatch(MovesToDevice):
    tokens: SharedPromptBatch  # one row per record; responses numbered 0..R-1 over the batch
    dpo_mask: torch.Tensor  # (N,) bool, aligned with tokens.targets: counts in the DPO sums
    chosen: torch.Tensor  # (P,) response index of each pair's chosen response
    rejected: torch.Tensor  # (P,) response index of each pair's rejected response
    ref_logps: torch.Tensor | None  # (R,) reference log-prob sums (DPO mask applied), when known

    @property
    def num_pairs(self) -> int:
        return int(self.chosen.numel())

    @property
    def num_responses(self) -> int:
        return int(self.tokens.last_index.numel())

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def padded_tokens(self) -> int:
        """Token slots of the batch, padding included."""
        return int(self.tokens.input_ids.numel())

    def model_inputs(self) -> tuple:
        return self.tokens.model_inputs()


def collate_pairs(
    examples: Sequence[PreferenceExample], pad_id: int, dtype=torch.float32,
    ref_logps: Sequence[Sequence[float]] | None = None, trunks: Sequence[torch.Tensor] | None = None,
) -> PairBatch:
    """Shared-prompt rows for ``examples``; ``ref_logps[i]`` holds example i's per-response reference sums;
    ``trunks[i]`` its hidden states after the frozen lower layers (``collate_shared``)."""
    tokens = collate_shared([build_row(ex.prompt_ids, ex.responses) for ex in examples], pad_id, dtype,
                            trunks=trunks)
    dpo_mask, chosen, rejected, base = [], [], [], 0
    for ex in examples:
        for mask in ex.dpo_masks:
            dpo_mask += mask
        chosen += [base + c for c, _ in ex.pairs]
        rejected += [base + r for _, r in ex.pairs]
        base += len(ex.responses)
    ref = None
    if ref_logps is not None:
        ref = torch.tensor([v for values in ref_logps for v in values], dtype=torch.float32)
    return PairBatch(
        tokens=tokens,
        dpo_mask=torch.tensor(dpo_mask, dtype=torch.bool),
        chosen=torch.tensor(chosen, dtype=torch.long),
        rejected=torch.tensor(rejected, dtype=torch.long),
        ref_logps=ref,
    )


def examples_digest(examples: Sequence[PreferenceExample], h) -> None:
    """Feed everything that determines the reference log-probs of ``examples`` into hash ``h``."""
    for ex in examples:
        h.update(repr((ex.prompt_ids, ex.responses, ex.dpo_masks)).encode())
