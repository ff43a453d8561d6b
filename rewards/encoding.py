"""Token ids of (prompt, response) for a reward model: one rule, used by training (align) and scoring.

A response is scored at its last token, which the chat template makes its end-of-turn token
(``<|eot_id|>`` for Llama 3). The ids are the tokenizer's chat template rendered over
``prompt + [response]`` and tokenised with ``add_special_tokens=False`` (the template writes BOS
itself), exactly what TRL's ``RewardTrainer`` and ``apply_chat_template(tokenize=True)`` produce. The
prompt part is the template rendered with ``add_generation_prompt=True`` (it ends with the assistant
header); the rendered prompt must be a prefix of the rendered conversation in text. When the tokenizer
merges the prompt's last token with the response's first (ChatML's ``assistant\n`` before a response that
starts with spaces), the response is tokenised on its own from the text boundary, as TRL does;
:func:`response_tokens` says so (``split``), and callers count it (``boundary_adjusted``).

Truncation (only when ``max_length`` is set):

- a prompt keeps its last ``max_prompt_length`` tokens (default ``max_length // 2``), cut from the left,
  whatever its responses' lengths (so every response of a prompt shares the same prompt ids);
- each response is cut to ``max_length - len(prompt)`` tokens, keeping its final (end-of-turn) token, so
  the score is always read at the same kind of token.

The rule looks at one prompt and one response at a time, so scoring a (prompt, response) alone gives
exactly the ids it had inside its (packed, several-response) training record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_MAX_LENGTH = 2  # the shortest truncation length: one prompt token and one response token


class EncodingError(ValueError):
    """The tokenizer's chat template cannot split a conversation into prompt and response tokens."""


def as_message_dicts(messages: Any) -> list[dict]:
    """Messages as ``{"role", "content"}`` dicts: accepts dicts, objects with ``role``/``content``
    (pydantic ``Message``) or, for a single user turn, a plain string."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if isinstance(messages, dict) or hasattr(messages, "role"):  # one message
        messages = [messages]
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def as_response_dict(response: Any) -> dict:
    """A response as an assistant message dict: a string (the content), a message, or a list holding
    one message (TRL's ``chosen`` form)."""
    if isinstance(response, str):
        return {"role": "assistant", "content": response}
    messages = as_message_dicts(response)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError("a response must be one assistant message")
    return messages[0]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokens(tokenizer, text: str, offsets: bool) -> tuple[list[int], list[int]]:
    """(ids, char offset where each token starts; empty unless ``offsets``)."""
    if not offsets:
        return _ids(tokenizer, text), []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]


def encode_prompt(tokenizer, prompt: Any) -> tuple[str, list[int]]:
    """(rendered prompt text ending with the assistant header, its ids)."""
    text = tokenizer.apply_chat_template(as_message_dicts(prompt), tokenize=False, add_generation_prompt=True)
    return text, _ids(tokenizer, text)


@dataclass(frozen=True)
class ResponseTokens:
    ids: list[int]  # the response's ids as they follow the prompt's
    starts: list[int]  # where each token starts in ``text`` (chars; empty unless asked for)
    text: str  # the rendered conversation, prompt + response
    split: bool  # tokenised from the text boundary: the tokenizer merged it with the prompt's end


def response_tokens(
    tokenizer, prompt: Any, response: Any, encoded_prompt=None, offsets: bool = False
) -> ResponseTokens:
    """``response`` as it follows ``prompt`` in the rendered conversation (the module's rule).

    ``encoded_prompt``: the result of :func:`encode_prompt` for this prompt (saves re-rendering it when
    one prompt has several responses); ``offsets``: also where each token starts (a fast tokenizer).
    """
    prompt_text, prompt_ids = encoded_prompt or encode_prompt(tokenizer, prompt)
    messages = as_message_dicts(prompt) + [as_response_dict(response)]
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise EncodingError(
            "the chat template does not render the prompt (with the generation prompt) as a prefix of the "
            "conversation; use a Llama 3 style template"
        )
    full_ids, starts = _tokens(tokenizer, full_text, offsets)
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids and len(full_ids) > n:
        return ResponseTokens(full_ids[n:], starts[n:], full_text, split=False)
    # The tokenizer merges the end of the prompt with the start of the response (ChatML's "assistant\n"
    # followed by a response that starts with spaces: "\n  " is one token). The boundary is then the text
    # boundary: the response's text is tokenised on its own, as TRL does when it tokenises prompt and
    # response separately. Training and scoring use this same rule, so a response has the same ids in both.
    ids, starts = _tokens(tokenizer, full_text[len(prompt_text) :], offsets)
    if not ids:
        raise EncodingError("the response renders to no tokens")
    return ResponseTokens(ids, [s + len(prompt_text) for s in starts], full_text, split=True)


def encode_response(tokenizer, prompt: Any, response: Any, encoded_prompt=None) -> list[int]:
    """Ids of ``response`` as it follows ``prompt`` in the rendered conversation (:func:`response_tokens`)."""
    return response_tokens(tokenizer, prompt, response, encoded_prompt).ids


def truncate(
    prompt_ids: Sequence[int],
    responses_ids: Sequence[Sequence[int]],
    max_length: int | None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation rule of the module docstring; returns new lists."""
    prompt, responses = list(prompt_ids), [list(r) for r in responses_ids]
    if max_length is None:
        return prompt, responses
    if max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_MAX_LENGTH} (one prompt and one response token)")
    keep = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep = max(1, min(keep, max_length - 1))
    if len(prompt) > keep:
        prompt = prompt[-keep:]
    room = max_length - len(prompt)
    responses = [r if len(r) <= room else r[: room - 1] + r[-1:] for r in responses]
    return prompt, responses


def encode_scored(
    tokenizer, prompt: Any, response: Any, max_length: int | None = None, max_prompt_length: int | None = None
) -> tuple[list[int], bool]:
    """(ids of one (prompt, response) as the reward model scores it (truncated by the module's rule),
    whether the response was split from the prompt at the text boundary)."""
    encoded = encode_prompt(tokenizer, prompt)
    response = response_tokens(tokenizer, prompt, response, encoded)
    prompt_ids, (response_ids,) = truncate(encoded[1], [response.ids], max_length, max_prompt_length)
    return prompt_ids + response_ids, response.split


def encode_pair(
    tokenizer, prompt: Any, response: Any, max_length: int | None = None, max_prompt_length: int | None = None
) -> list[int]:
    """Ids of one (prompt, response) as the reward model scores it (truncated by the module's rule)."""
    return encode_scored(tokenizer, prompt, response, max_length, max_prompt_length)[0]
