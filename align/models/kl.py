"""Full next-token log-prob distributions along responses, and a policy's exact KL to its reference.

``kl_to_reference`` is the per-token KL(policy || reference) over the full next-token distributions,
summed over each response's tokens and averaged over prompts, along given responses (the policy's own,
for evaluation): deterministic for greedy decoding and never negative, unlike a sampled log-ratio estimate.
The lower decoder layers the two models share (a LoRA policy on the top layers: :mod:`align.models.trunk`)
run once for both, and the LM head only at the response positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from align.data.chat import termination_token_id, tokenize_prompt
from align.losses.kl import exact_kl
from align.models.inference import causal_only, eval_mode
from align.models.logps import decoder_and_head
from align.models.trunk import hidden_from, shared_layers, trunk_states


def _batches(tokenizer, prompts, responses, finished, batch_size: int, device) -> Iterator[tuple]:
    """(ids (B, T), padding mask (B, T), index (N,) flat positions predicting the response tokens, lengths
    [n_response_tokens per row]) per batch of ``batch_size`` prompts, right-padded."""
    eot = termination_token_id(tokenizer)
    finished = [True] * len(responses) if finished is None else list(finished)
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        rows, spans = [], []
        for p, r, done in zip(prompts[start:end], responses[start:end], finished[start:end], strict=True):
            prompt_ids = tokenize_prompt(tokenizer, p)
            resp_ids = list(tokenizer(r, add_special_tokens=False)["input_ids"]) + ([eot] if done else [])
            rows.append(prompt_ids + resp_ids)
            spans.append((len(prompt_ids), len(resp_ids)))
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T) 1 = real token (HF's convention)
        index = []
        for i, (x, (p_len, r_len)) in enumerate(zip(rows, spans, strict=True)):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
            index.extend(i * width + t for t in range(p_len - 1, p_len - 1 + r_len))
        yield ids.to(device), mask.to(device), torch.tensor(index, dtype=torch.long, device=device), \
            [r for _, r in spans]


def _vocab_logps(model, k: int, trunk, ids, mask, index) -> torch.Tensor:
    """(N, V) float32 log-softmax at ``index``; from ``trunk`` (the states after layer k) when given."""
    decoder, head = decoder_and_head(model)
    hidden = hidden_from(decoder, index, trunk, k, input_ids=ids, attention_mask=causal_only(mask))
    return head(hidden).float().log_softmax(-1)


@torch.no_grad()
def response_vocab_logps(model, tokenizer, prompts, responses, batch_size: int = 16,
                         finished: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """Per prompt: (n_response_tokens, V) float32 log-softmax over the response positions (incl. eot).

    prompts: conversations (message lists ending with a user turn); responses: their answers' text;
    finished: whether each answer ended with the termination token (default: all did); an answer cut at the
    length limit has no eot position."""
    out = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for ids, mask, index, lengths in _batches(tokenizer, prompts, responses, finished, batch_size, device):
            out.extend(t.cpu() for t in _vocab_logps(model, 0, None, ids, mask, index).split(lengths))
    return out


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts, responses, finished: Sequence[bool] | None = None,
                    batch_size: int = 16) -> float:
    """Mean over prompts of the response's summed per-token KL(policy || reference) (see the module); the
    termination token's position counts only for the answers that ``finished`` (default: all)."""
    k = shared_layers(policy, reference)
    device = next(policy.parameters()).device
    per_prompt: list[float] = []
    with eval_mode(policy), eval_mode(reference):
        for ids, mask, index, lengths in _batches(tokenizer, prompts, responses, finished, batch_size, device):
            trunk = trunk_states(reference, k, input_ids=ids, attention_mask=causal_only(mask)) if k else None
            pol = _vocab_logps(policy, k, trunk, ids, mask, index)
            ref = _vocab_logps(reference, k, trunk, ids, mask, index)
            per_prompt.extend(float(x.sum()) for x in exact_kl(pol, ref).split(lengths))
    return sum(per_prompt) / max(len(per_prompt), 1)

