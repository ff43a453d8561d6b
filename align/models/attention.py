"""Attention paid to an instruction, turn by turn (Llama 2, Figure 10: with Ghost Attention the model keeps
attending to the system message's tokens late in the dialogue).

``instruction_attention(model, tokenizer, messages, instruction)``: one forward pass over the conversation
(rendered with the chat template, as :func:`align.data.chat.tokenize_chat` does) with
``output_attentions=True``; for each assistant turn, the share of attention its tokens (content and
termination token, the tokens of the loss mask) put on the instruction's tokens: summed over the
instruction's positions, averaged over layers, heads and the turn's tokens. Rows of attention sum to 1,
so the share is in [0, 1].

Attention probabilities exist only with the eager implementation: the model is switched to it for the
pass (``set_attn_implementation("eager")``) and switched back. Memory: layers x heads x length^2 values
for one conversation at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from align.data.chat import assistant_char_spans


def instruction_char_span(text: str, instruction: str, after: int = 0) -> tuple[int, int]:
    """(start, end) of the first occurrence of ``instruction`` in ``text`` from ``after`` on."""
    start = text.find(instruction, after)
    if start < 0:
        raise ValueError(f"the instruction {instruction!r} is not in the rendered conversation")
    return start, start + len(instruction)


def token_positions(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Tokens whose character range overlaps ``span`` (a token is ``offsets[i] = (start, end)``)."""
    lo, hi = span
    return [i for i, (s, e) in enumerate(offsets) if s < hi and e > lo and e > s]


@contextmanager
def eager_attention(model):
    """Switch ``model`` to eager attention (which returns attention probabilities) for a block."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


def _encode(tokenizer, messages: Sequence, instruction: str):
    """-> (input ids, instruction token positions, token positions of each assistant turn)."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    positions = token_positions(offsets, instruction_char_span(text, instruction))
    turns = [token_positions(offsets, s) for s in spans]
    return list(enc["input_ids"]), positions, turns


@torch.no_grad()
def instruction_attention(model, tokenizer, messages: Sequence, instruction: str) -> list[float]:
    """For each assistant turn of ``messages``, the share of its tokens' attention on the tokens of
    ``instruction`` (the first place its text occurs in the rendered conversation); see the module
    docstring."""
    ids, positions, turns = _encode(tokenizer, messages, instruction)
    if not positions:
        raise ValueError(f"no token of the instruction {instruction!r} was found")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True, use_cache=False)
    finally:
        model.train(was_training)
    if not out.attentions:
        raise RuntimeError("the model returned no attention probabilities (output_attentions=True)")
    keys = torch.tensor(positions, device=device)
    # (layers, heads, queries): attention each query puts on the instruction's tokens
    on_instruction = torch.stack([a[0].float().index_select(-1, keys).sum(-1) for a in out.attentions])
    per_query = on_instruction.mean(dim=(0, 1))  # (T,) averaged over layers and heads
    return [float(per_query[q].mean()) if q else float("nan") for q in turns]
