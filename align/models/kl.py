"""Full next-token log-prob distributions along responses, and a policy's exact KL to its reference.

``kl_to_reference`` is the per-token KL(policy || reference) over the full next-token distributions,
summed over each response's tokens and averaged over prompts, along given responses (the policy's own,
for evaluation): deterministic for greedy decoding and never negative, unlike a sampled log-ratio estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.data.chat import termination_token_id, tokenize_prompt
from align.losses.kl import exact_kl
from align.models.inference import no_grad_map


def response_vocab_logps(model, tokenizer, prompts, responses, batch_size: int = 16,
                         finished: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """Per prompt: (n_response_tokens, V) float32 log-softmax over the response positions (incl. eot).

    prompts: conversations (message lists ending with a user turn); responses: their answers' text;
    finished: whether each answer ended with the termination token (default: all did); an answer cut at the
    length limit has no eot position."""
    eot = termination_token_id(tokenizer)
    device = next(model.parameters()).device
    finished = [True] * len(responses) if finished is None else list(finished)

    def make_batch(start):
        rows, spans = [], []
        end = start + batch_size
        for p, r, done in zip(prompts[start:end], responses[start:end], finished[start:end], strict=True):
            prompt_ids = tokenize_prompt(tokenizer, p)
            resp_ids = list(tokenizer(r, add_special_tokens=False)["input_ids"]) + ([eot] if done else [])
            rows.append(prompt_ids + resp_ids)
            spans.append((len(prompt_ids), len(resp_ids)))
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T) 1 = real token (HF's convention)
        for i, x in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return ids.to(device), mask.to(device), spans

    def forward(m, batch):
        ids, mask, _ = batch
        return m(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)

    out = []
    for (_, _, spans), logits in no_grad_map(model, range(0, len(prompts), batch_size), make_batch, forward):
        for i, (p_len, r_len) in enumerate(spans):
            out.append(logits[i, p_len - 1 : p_len - 1 + r_len].log_softmax(-1).cpu())
    return out


def kl_to_reference(policy, reference, tokenizer, prompts, responses, finished: Sequence[bool] | None = None) -> float:
    """Mean over prompts of the response's summed per-token KL(policy || reference) (see the module); the
    termination token's position counts only for the answers that ``finished`` (default: all)."""
    pol = response_vocab_logps(policy, tokenizer, prompts, responses, finished=finished)
    ref = response_vocab_logps(reference, tokenizer, prompts, responses, finished=finished)
    per_prompt = [float(exact_kl(p, r, dim=(-2, -1))) for p, r in zip(pol, ref, strict=True)]
    return sum(per_prompt) / max(len(per_prompt), 1)
