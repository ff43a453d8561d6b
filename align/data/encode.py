"""One preference record -> token ids: the one encoder of DPO (``align.data.preference``) and the reward model
(``align.data.ranking``).

Token ids follow ``rewards.encoding``, the rule ``rewards.scoring.RewardScorer`` scores with: the prompt is
the chat template rendered with the generation prompt and tokenized alone; a response is the rest of the
rendered conversation, tokenized with it, or on its own from the text boundary when the tokenizer merges
the prompt's last token with the response's first (ChatML's ``assistant\\n`` before a response that starts
with spaces; counted in ``boundary_adjusted``). So every response of a record shares the prompt's ids.

The stages differ only in how they cut a record to ``max_length`` (``truncation``):

- ``"keep_final"`` (the reward model; :func:`rewards.encoding.truncate`, which its scorer uses too): the
  prompt keeps its last ``max_prompt_length`` tokens (default ``max_length // 2``); a cut response keeps its
  final (end-of-turn) token, where the score is read;
- ``"cut_end"`` (DPO): the prompt is never cut and a response loses its end (the log-prob sums cover the
  tokens kept, as TRL's DPO does); a record whose prompt alone fills ``max_length`` has no row (None).

Template masks (``template_masks=True``, for DPO's formatting-token mask): True on a response token the chat
template emitted, i.e. one that does not start inside the response's content span in the rendered text. If a
template rewrites the content so that it cannot be found verbatim, the whole response counts as template text
(``mask_id_fallbacks``: DPO then masks by id alone).

Everything counted is returned (:class:`EncodeCounts`), per record: nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from data_schemas import PreferenceRecord
from rewards.encoding import ResponseTokens, encode_prompt, response_tokens, truncate

Truncation = Literal["keep_final", "cut_end"]


@dataclass(frozen=True)
class EncodeCounts:
    truncated_prompts: int = 0  # 1 when the prompt was cut ("keep_final")
    truncated_responses: int = 0  # responses cut at max_length
    boundary_adjusted: int = 0  # responses tokenized apart from the prompt (merged with its last token)
    mask_id_fallbacks: int = 0  # responses whose content span was not found (template_masks only)


@dataclass(frozen=True)
class EncodedPreference:
    prompt_ids: list[int]
    responses: list[list[int]]  # ids of each encoded response (content + termination token), cut
    template_masks: list[list[bool]] | None  # per response: True where the chat template emitted the token


def encode_preference(
    tokenizer, record: PreferenceRecord, *, keep: Sequence[int] | None = None, max_length: int | None = None,
    truncation: Truncation = "keep_final", max_prompt_length: int | None = None, template_masks: bool = False,
) -> tuple[EncodedPreference | None, EncodeCounts]:
    """-> (the record's ids, or None when ``"cut_end"`` leaves the prompt no room; what was counted).

    ``keep``: indices of the responses to encode, in that order (default: all, best first).
    ``template_masks`` needs a fast tokenizer (token offsets)."""
    if truncation not in ("keep_final", "cut_end"):
        raise ValueError(f"unknown truncation {truncation!r}")
    encoded_prompt = encode_prompt(tokenizer, record.prompt)
    picked = [record.responses[k] for k in (range(len(record.responses)) if keep is None else keep)]
    tokens = [response_tokens(tokenizer, record.prompt, r, encoded_prompt, template_masks) for r in picked]
    masks = None
    if template_masks:
        masks = [template_mask(t, r, len(encoded_prompt[0])) for t, r in zip(tokens, picked, strict=True)]
    full = [t.ids for t in tokens]
    boundary, fallbacks = sum(t.split for t in tokens), sum(map(all, masks or []))
    prompt_ids = encoded_prompt[1]
    if truncation == "keep_final":
        prompt_ids, responses = truncate(prompt_ids, full, max_length, max_prompt_length)
    else:  # "cut_end"
        room = None if max_length is None else max_length - len(prompt_ids)
        if room is not None and room <= 0:
            return None, EncodeCounts(boundary_adjusted=boundary, mask_id_fallbacks=fallbacks)
        responses = [r[:room] for r in full]
    if masks is not None:
        masks = [_cut_like(m, len(r), truncation) for m, r in zip(masks, responses, strict=True)]
    counts = EncodeCounts(
        truncated_prompts=int(len(prompt_ids) < len(encoded_prompt[1])),
        truncated_responses=sum(len(a) != len(b) for a, b in zip(full, responses, strict=True)),
        boundary_adjusted=boundary, mask_id_fallbacks=fallbacks,
    )
    return EncodedPreference(prompt_ids, responses, masks), counts


def template_mask(tokens: ResponseTokens, response, prompt_chars: int) -> list[bool]:
    """True on each token of ``tokens`` that does not start inside ``response``'s content (stripped, as the
    templates write it) in the rendered conversation; all True when the content is not found there."""
    content = (response["content"] if isinstance(response, dict) else response.content).strip()
    at = tokens.text.find(content, prompt_chars, len(tokens.text)) if content else -1
    if at < 0:
        return [True] * len(tokens.ids)
    return [not (at <= s < at + len(content)) for s in tokens.starts]


def _cut_like(mask: list[bool], length: int, truncation: Truncation) -> list[bool]:
    """``mask`` cut as its response was cut to ``length`` tokens."""
    if len(mask) <= length:
        return mask
    return mask[: length - 1] + mask[-1:] if truncation == "keep_final" else mask[:length]
