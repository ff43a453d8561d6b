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
end of the prompt are tokenized from the text boundary (``boundary_adjusted``, see :func:`tokenize_response`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from align.config.specs import DataSpec
from align.data.builtin import BUILTIN_PREFERENCE
from align.data.chat import ChatFormatError, assistant_char_spans
from align.data.shared_prompt import SharedPromptBatch, build_row, collate_shared
from align.data.sources import gather, split_by_prompt, subset
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


def load_preferences(spec: DataSpec, paths: Sequence[str], seed: int) -> tuple[list, list]:
    """-> (train, eval) lists of PreferenceRecord from files, an earlier stage's pairs, or a built-in set
    (``chat``, or the world's ``world``, ``world_helpful``, ``world_safety``)."""
    records = subset(gather(BUILTIN_PREFERENCE, spec, paths, "preference", seed, "preference"), spec, seed)
    return split_by_prompt(records, spec.eval_fraction, seed)


def select_pairs(num_responses: int, mode: PairsMode) -> tuple[list[int], list[tuple[int, int]]]:
    """Ranked responses -> (indices of the responses kept, pairs as indices into the kept list)."""
    if mode == "best_worst":
        return [0, num_responses - 1], [(0, 1)]
    if mode == "adjacent":
        return list(range(num_responses)), [(i, i + 1) for i in range(num_responses - 1)]
    raise ValueError(f"unknown pairs mode {mode!r}")


def tokenize_response(
    tokenizer, prompt: Sequence, response, split: bool = False,
) -> tuple[list[int], list[int], list[bool], bool]:
    """(prompt ids ending with the assistant header, response ids, template_mask, split at the text
    boundary) for one response.

    ``template_mask`` is True on response tokens the chat template emitted rather than the content. The
    conversation is tokenized as a whole; when a token spans the end of the prompt and the start of the
    response (ChatML's ``assistant\n`` before a response that starts with spaces), or with ``split``, the
    prompt text and the response text are tokenized apart, from the text boundary, as TRL does and as the
    reward model does (``rewards.encoding``); the last value says so.
    """
    text, spans = assistant_char_spans(tokenizer, [*prompt, response])
    start, end = spans[-1]
    content = (response["content"] if isinstance(response, dict) else response.content).strip()
    at = text.find(content, start, end) if content else -1
    content_span = (at, at + len(content)) if at >= 0 else None

    def encode(piece: str, shift: int) -> list[tuple[int, int, int]]:  # (id, start, end) in ``text``
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        return [(tok, s + shift, e + shift) for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]

    tokens = [] if split else encode(text[:end], 0)
    split = split or any(s < start < e for _, s, e in tokens)
    if split:
        tokens = encode(text[:start], 0) + encode(text[start:end], start)
    prompt_ids, response_ids, template = [], [], []
    for tok, s, _ in tokens:
        if s < start:  # no token spans ``start`` here: those are split above
            prompt_ids.append(tok)
        elif s < end:
            response_ids.append(tok)
            template.append(content_span is None or not (content_span[0] <= s < content_span[1]))
    return prompt_ids, response_ids, template, split


def tokenize_preference(
    tokenizer, record: PreferenceRecord, formatting_ids: frozenset[int], max_length: int, pairs: PairsMode,
) -> tuple[PreferenceExample | None, int, int]:
    """-> (example or None when the prompt alone fills ``max_length``, id-only fallbacks, responses split
    at the text boundary).

    Each prompt + response is cut to ``max_length`` tokens (the response's end is dropped). When one
    response of a record must be split at the text boundary, all of them are, so they share the prompt ids."""
    keep, pair_idx = select_pairs(len(record.responses), pairs)
    encoded = [tokenize_response(tokenizer, record.prompt, record.responses[k]) for k in keep]
    if any(split for *_, split in encoded) and len({tuple(p) for p, *_ in encoded}) > 1:
        encoded = [tokenize_response(tokenizer, record.prompt, record.responses[k], split=True) for k in keep]
    prompt_ids, responses, masks, fallbacks, truncated = encoded[0][0], [], [], 0, 0
    splits = sum(split for *_, split in encoded)
    for p_ids, r_ids, template, _ in encoded:
        if p_ids != prompt_ids:
            raise ChatFormatError("the prompt tokenizes differently for two responses of one record")
        fallbacks += all(template)
        room = max_length - len(prompt_ids)
        if room <= 0:
            return None, fallbacks, splits
        responses.append(r_ids[:room])
        masks.append([not (t and i in formatting_ids) for i, t in zip(r_ids[:room], template[:room], strict=True)])
        truncated += len(r_ids) > room
    return PreferenceExample(prompt_ids, responses, masks, pair_idx, truncated), fallbacks, splits


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
class PairBatch:
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

    def to(self, device) -> PairBatch:
        t = self.tokens
        for name in ("input_ids", "position_ids", "attention_mask", "index", "targets", "owner", "last_index"):
            setattr(t, name, getattr(t, name).to(device))
        for name in ("dpo_mask", "chosen", "rejected", "ref_logps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def collate_pairs(
    examples: Sequence[PreferenceExample], pad_id: int, dtype=torch.float32,
    ref_logps: Sequence[Sequence[float]] | None = None,
) -> PairBatch:
    """Shared-prompt rows for ``examples``; ``ref_logps[i]`` holds example i's per-response reference sums."""
    tokens = collate_shared([build_row(ex.prompt_ids, ex.responses) for ex in examples], pad_id, dtype)
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
