"""The default generation backend: a HF causal LM, K samples per prompt after ONE shared prefill.

``model.generate(num_return_sequences=K)`` copies each prompt K times before the prefill, so the prompt is
encoded K times. Here a batch of prompts (left-padded) is encoded once into a preallocated KV cache
(``StaticCache``: no copy of the whole cache per new token, as a growing ``DynamicCache`` makes), the
cache is repeated K times along the batch and the K x B sequences are decoded by a plain sampling loop: temperature, top-p, stop at the termination token per sequence, noise from a seeded
``torch.Generator``. Greedy decoding (temperature 0) gives the same tokens as ``generate(do_sample=False)``.

Simplifications: sequences that have stopped are dropped from the batch only once a quarter of the batch
has stopped (each drop copies the cache); the noise depends on the seed and on which prompts share a
call (prompts are sorted by length, then cut into calls of ``batch_size``), not on the prompt alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.compat import cache_kwarg
from align.config.sampling import SamplingParams
from align.data.chat import termination_token_id
from align.generation.protocol import Prompt, Sample, check_k, prompt_ids


def sampling_logps(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(N, V) logits -> (N, V) log-probs of the distribution a token is drawn from.

    ``log_softmax(logits / temperature)``, then nucleus truncation: a token is kept when the probability
    of the tokens more likely than it is below ``top_p`` (so the most likely token always is), and the
    kept tokens are renormalised; dropped tokens get -inf.
    """
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logps
    sorted_logps, order = logps.sort(dim=-1, descending=True)
    probs = sorted_logps.exp()
    mass_before = probs.cumsum(dim=-1) - probs
    drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
    return torch.log_softmax(logps.masked_fill(drop, float("-inf")), dim=-1)


def nucleus_mask(logps: torch.Tensor, top_p: float, buckets: int = 1024,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) log-probs -> (N, V) bool: the tokens top-p keeps (those of :func:`sampling_logps`: a token is kept
    when the probability of the tokens more likely than it is below ``top_p``), without sorting the
    vocabulary.

    Sorting 32k logits per row per step was over half of decoding on CPU. Instead: the log-probs of a row
    are cut into ``buckets`` equal slices between its largest and smallest value; the mass per slice
    (``scatter_add``) and its running sum give, in O(V), the slices kept whole (all of their tokens have
    less than ``top_p`` above them), the slices dropped whole, and the one slice where the boundary falls;
    only that slice's tokens are sorted (``topk`` over them) to place the boundary token by token. Exact up
    to the order of float additions and of tied probabilities. ``probs``: ``logps.exp()`` when the caller has it.
    """
    n = logps.shape[0]
    probs = logps.exp() if probs is None else probs
    hi = logps.max(dim=-1, keepdim=True).values
    lo = torch.maximum(logps.min(dim=-1, keepdim=True).values, hi - 80.0)  # -inf (zero probability) capped
    width = ((hi - lo) / buckets).clamp(min=1e-30)
    slot = ((hi - logps) / width).floor().clamp_(0, buckets - 1).long()  # 0: the most likely slice
    mass = torch.zeros(n, buckets, dtype=probs.dtype, device=probs.device).scatter_add_(1, slot, probs)
    cum = mass.cumsum(dim=-1)
    boundary = (cum < top_p).sum(dim=-1, keepdim=True).clamp_(max=buckets - 1)  # (N, 1) first slice reaching top_p
    kept = slot < boundary
    above = (cum - mass).gather(1, boundary)  # (N, 1) mass of the slices before the boundary slice
    inside = slot == boundary
    width_k = int(inside.sum(dim=-1).max())
    values, index = probs.masked_fill(~inside, -1.0).topk(width_k, dim=-1)  # the boundary slice, descending
    real = values >= 0
    before = values.clamp(min=0).cumsum(dim=-1) - values.clamp(min=0)
    keep_inside = real & (above + before < top_p)
    return kept.scatter_(1, index, keep_inside | kept.gather(1, index))


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """One token per row of (N, V) ``logits`` -> (tokens (N,), their log-probs (N,)) under the
    distribution of :func:`sampling_logps`; greedy when ``params.temperature == 0`` (log-prob 0: the
    token was certain under greedy decoding).

    Inverse-CDF sampling: one uniform number per row, located in the cumulative probabilities of the kept
    tokens (top-p: :func:`nucleus_mask`, no sort of the vocabulary) in vocabulary order. Cheaper than
    ``torch.multinomial``, which draws V exponentials per row, and than sorting every row.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    logits = logits.float()
    logps = torch.log_softmax(logits if params.temperature == 1 else logits / params.temperature, dim=-1)
    probs = logps.exp()
    if params.top_p < 1.0:
        probs = probs.masked_fill(~nucleus_mask(logps, params.top_p, probs=probs), 0.0)
    cdf = probs.cumsum(dim=-1)  # (N, V)
    mass = cdf[:, -1:]  # (N, 1) probability of the kept tokens
    u = torch.rand(mass.shape, generator=generator, device=mass.device) * mass
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # (N, 1): first cdf > u
    token_logps = (logps.gather(1, index) - mass.log()).squeeze(1)
    return index.squeeze(1), token_logps


@dataclass
class _Decoded:
    tokens: torch.Tensor  # (N, max_new_tokens) generated ids, pad after the end
    lengths: torch.Tensor  # (N,) how many ids each sequence generated (stop token included)
    stopped: torch.Tensor  # (N,) bool, True where the stop token was reached
    logps_sum: torch.Tensor  # (N,) float


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids (B, P), attention_mask (B, P) bool), padded on the left."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = True
    return input_ids.to(device), mask.to(device)


def repeat_rows(cache, k: int) -> None:
    """Repeat every row of a KV cache ``k`` times in place (row i -> rows i*k .. i*k+k-1).

    ``DynamicCache.batch_repeat_interleave`` does this for dynamic layers only; this works on any layer
    that keeps its keys and values as (batch, heads, length, head_dim) tensors, static layers included.
    """
    _map_rows(cache, lambda t: t.repeat_interleave(k, dim=0))


def keep_rows(cache, index: torch.Tensor) -> None:
    """Keep only the cache rows in ``index`` (1-D), in place."""
    _map_rows(cache, lambda t: t.index_select(0, index))


def _map_rows(cache, fn) -> None:
    for layer in cache.layers:
        if not isinstance(getattr(layer, "keys", None), torch.Tensor):
            raise TypeError(f"cannot share a prefill with cache layers of type {type(layer).__name__}")
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        if hasattr(layer, "batch_size"):  # static layers record their batch size
            layer.batch_size = layer.keys.shape[0]


@torch.no_grad()
def decode_shared_prefill(model, batch: Sequence[Sequence[int]], k: int, params: SamplingParams,
                          stop_ids: Sequence[int], pad_id: int, generator: torch.Generator | None) -> _Decoded:
    """Sample ``k`` continuations of each prompt in ``batch``; rows ``i * k .. i * k + k - 1`` of the
    result belong to prompt i.

    1. left-pad the prompts  2. prefill once into a preallocated (static) KV cache: no copy of the
    cache per new token, as a growing cache makes  3. repeat cache, logits and mask k times
    4. decode: draw, record, stop, drop stopped rows, step.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    # step 1
    input_ids, prompt_mask = left_pad(batch, pad_id, device)
    width, steps = input_ids.shape[1], params.max_new_tokens
    position_ids = (prompt_mask.long().cumsum(-1) - 1).masked_fill(~prompt_mask, 1)  # as generate() does
    mask = torch.zeros((len(batch), width + steps), dtype=torch.long, device=device)  # (B, T) over the cache
    mask[:, :width] = prompt_mask
    # step 2
    cache = StaticCache(config=model.config, max_cache_len=width + steps)
    with_cache = cache_kwarg(model, cache)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                **with_cache, use_cache=True, logits_to_keep=1)
    # step 3
    repeat_rows(cache, k)
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)  # (N, V), N = B * k
    mask = mask.repeat_interleave(k, dim=0)  # (N, T)
    positions = prompt_mask.sum(-1).repeat_interleave(k)  # (N,) position of the next token
    n = logits.shape[0]
    result = _Decoded(tokens=torch.full((n, steps), pad_id, dtype=torch.long, device=device),
                      lengths=torch.zeros(n, dtype=torch.long, device=device),
                      stopped=torch.zeros(n, dtype=torch.bool, device=device),
                      logps_sum=torch.zeros(n, dtype=torch.float32, device=device))
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # result row of each sequence still in the batch
    done = torch.zeros(n, dtype=torch.bool, device=device)  # in the batch but already stopped
    # step 4
    for t in range(steps):
        tokens, logps = draw(logits, params, generator)
        live = rows[~done]
        result.tokens[live, t] = tokens[~done]
        result.logps_sum[live] += logps[~done]
        result.lengths[live] += 1
        hit = torch.isin(tokens, stop) & ~done
        result.stopped[rows[hit]] = True
        done |= hit
        if t == steps - 1 or bool(done.all()):
            break
        if 4 * int(done.sum()) >= done.numel():  # drop stopped rows: less work per step from here on
            keep = (~done).nonzero().squeeze(1)
            keep_rows(cache, keep)
            rows, mask, positions, tokens, done = rows[keep], mask[keep], positions[keep], tokens[keep], done[keep]
        mask[:, width + t] = 1  # the token fed now goes to cache column width + t
        out = model(input_ids=tokens.masked_fill(done, pad_id)[:, None], attention_mask=mask,
                    position_ids=positions[:, None], **with_cache, use_cache=True)
        logits = out.logits[:, -1].float()
        positions = positions + 1
    return result


class HFGenerator:
    """Generator over a loaded HF causal LM (CPU or GPU: the model's device)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eot_id = termination_token_id(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id

    def sample(self, prompts: Sequence[Prompt], k: int, params: SamplingParams) -> list[list[Sample]]:
        """1. render and tokenize  2. group prompts of similar length into calls of batch_size
        3. decode each call with one shared prefill  4. turn rows into Samples, in prompt order."""
        check_k(k)
        # step 1
        ids = [prompt_ids(self.tokenizer, p, params.system_prompt) for p in prompts]
        # step 2
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(params.seed)
        k_drawn = 1 if params.temperature == 0 else k  # greedy: the k samples are one sample
        stop_ids = [self.eot_id] if params.stop_at_eot else []
        results: list[list[Sample]] = [[] for _ in ids]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), params.batch_size):
                chunk = order[start:start + params.batch_size]
                # step 3
                decoded = decode_shared_prefill(self.model, [ids[i] for i in chunk], k_drawn, params,
                                                stop_ids, self.pad_id, generator)
                # step 4
                for row, sample in enumerate(self._samples(decoded, [ids[i] for i in chunk], k_drawn)):
                    results[chunk[row // k_drawn]].append(sample)
        finally:
            self.model.train(was_training)
        return [r * k if k_drawn == 1 and k > 1 else r for r in results]

    def _samples(self, decoded: _Decoded, prompts: list[list[int]], k: int) -> list[Sample]:
        """The decoded rows (``k`` per prompt of ``prompts``, in order) as Samples."""
        tokens, lengths = decoded.tokens.tolist(), decoded.lengths.tolist()
        stopped, logps = decoded.stopped.tolist(), decoded.logps_sum.tolist()
        samples = []
        for j, (row, n, s, lp) in enumerate(zip(tokens, lengths, stopped, logps, strict=True)):
            ids = row[:n]
            text = self.tokenizer.decode(ids[:-1] if s else ids, skip_special_tokens=True)
            samples.append(Sample(token_ids=ids, text=text, finish_reason="stop" if s else "length",
                                  logps_sum=lp, prompt_ids=tuple(prompts[j // k])))
        return samples

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
