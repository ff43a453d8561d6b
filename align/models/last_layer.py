"""The last decoder layer run only at the positions a loss reads.

Training objectives read the final hidden state at a few positions: SFT and DPO at the tokens before
each scored (response) token, a reward model at each response's last token. Every layer but the last
must run at every position (the next layer's keys and values need them); the last one needs its keys
and values everywhere but its queries, attention output projection and MLP only at the read positions.
:func:`hidden_at` runs it that way: on the world's SFT chats (30% of tokens scored) a 4-layer model
skips about a sixth of the step's matmul work; a reward model's last layer shrinks to keys and values.

Exact: the same operations on a subset of rows (equal to the full layer to float rounding; tested). Used
for decoder layers of the Llama form (pre-norm attention with rotary embeddings, then a pre-norm MLP:
Llama, Mistral, Qwen2) under SDPA or eager attention, with no KV cache, no attention dropout and no
activation checkpointing; any other layer (or a layer wrapped by FSDP) runs whole, so nothing changes there
but the speed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_ATTENTION = ("sdpa", "eager")


def hidden_at(decoder: nn.Module, index: torch.Tensor, *, prune: bool = True, **inputs) -> torch.Tensor:
    """The decoder's final hidden states (after its last norm) at ``index`` (flat positions into B*T):
    (N, H). ``inputs`` go to the decoder (input_ids, position_ids, attention_mask)."""
    with _last_layer_at(decoder, index if prune else None):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def prunable(decoder: nn.Module) -> bool:
    """Whether :func:`hidden_at` runs this decoder's last layer at the read positions only."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    layer = layers[-1]
    attn = getattr(layer, "self_attn", None)
    config = getattr(attn, "config", None)
    return (
        type(layer).__name__ in _LAYERS
        and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        and not hasattr(attn, "q_norm")
        and getattr(attn, "sliding_window", None) is None
        and getattr(config, "_attn_implementation", None) in _ATTENTION
        and hasattr(sys.modules[type(attn).__module__], "rotate_half")
    )


@contextmanager
def _last_layer_at(decoder: nn.Module, index: torch.Tensor | None):
    if index is None or not prunable(decoder) or getattr(decoder.layers[-1], "gradient_checkpointing", False):
        yield  # (a checkpointed layer recomputes its forward in the backward pass, after this call is over)
        return
    layer = decoder.layers[-1]
    full = layer.forward

    def forward(hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        dropout = layer.training and getattr(layer.self_attn, "attention_dropout", 0.0) > 0
        # eager attention adds a boolean mask as numbers (no masking): keep its behaviour by running it whole
        eager_bool = attention_mask is not None and attention_mask.dtype == torch.bool and \
            layer.self_attn.config._attn_implementation == "eager"
        if cache is not None or position_embeddings is None or dropout or eager_bool or kwargs.get("output_attentions"):
            return full(hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings,
                        **kwargs)
        return _pruned_layer(layer, hidden_states, attention_mask, position_embeddings, index)

    layer.forward = forward  # this call only: the instance attribute is removed again below
    try:
        yield
    finally:
        del layer.forward


def _pruned_layer(layer, hidden: torch.Tensor, mask: torch.Tensor | None, position_embeddings, index):
    """The decoder layer's output, correct at ``index`` (flat positions), the input elsewhere."""
    attn = layer.self_attn
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    B, T, H = hidden.shape
    d = attn.head_dim
    flat = hidden.reshape(B * T, H)
    x = layer.input_layernorm(hidden)  # (B, T, H): keys and values need every position
    k = attn.k_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, kv, T, d)
    v = attn.v_proj(x).view(B, T, -1, d).transpose(1, 2)
    cos, sin = (e.expand(B, T, d) for e in position_embeddings)  # (B, T, d)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)

    # the read positions, grouped by row: slot s of row b holds its s-th read position
    keep = torch.unique(index)  # (N,) sorted, each once (a shared prompt's last token is read twice in DPO)
    rows, pos = keep // T, keep % T
    counts = torch.bincount(rows, minlength=B)
    slot = torch.arange(len(keep), device=keep.device) - (counts.cumsum(0) - counts)[rows]
    S = int(counts.max())
    q = attn.q_proj(x.reshape(B * T, H).index_select(0, keep)).view(len(keep), -1, d)  # (N, heads, d)
    q = q * cos.reshape(B * T, 1, d)[keep] + rotate_half(q) * sin.reshape(B * T, 1, d)[keep]
    queries = q.new_zeros(B, S, q.shape[1], d).index_put((rows, slot), q).transpose(1, 2)  # (B, heads, S, d)
    qpos = torch.zeros(B, S, dtype=torch.long, device=keep.device).index_put((rows, slot), pos)
    real = torch.zeros(B, S, dtype=torch.bool, device=keep.device).index_put(
        (rows, slot), torch.ones_like(pos, dtype=torch.bool))
    allowed = _mask_rows(mask, qpos, real, B, T, hidden.dtype)  # (B, 1, S, T)
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=allowed, scale=attn.scaling,
                                         enable_gqa=k.shape[1] != queries.shape[1])  # (B, heads, S, d)
    out = out.transpose(1, 2)[rows, slot].reshape(len(keep), -1)  # (N, heads * d)
    h = flat.index_select(0, keep) + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return flat.index_copy(0, keep, h).view(B, T, H)


def _mask_rows(mask, qpos, real, B: int, T: int, dtype) -> torch.Tensor:
    """The attention mask's rows of the query positions ``qpos`` (B, S): (B, 1, S, T), boolean (True:
    attend) or additive like the mask the layer got; None means causal. Padding slots (not ``real``) may
    attend to every key, so they never make a row without keys (their outputs are dropped)."""
    S = qpos.shape[1]
    if mask is None:
        rows = torch.arange(T, device=qpos.device).view(1, 1, T) <= qpos.unsqueeze(-1)  # (B, S, T)
    else:
        full = mask.expand(B, 1, T, T)[:, 0]  # (B, T, T)
        rows = full.gather(1, qpos.unsqueeze(-1).expand(B, S, T))
    if rows.dtype == torch.bool:
        rows = rows | ~real.unsqueeze(-1)
    else:
        rows = rows.masked_fill(~real.unsqueeze(-1), 0.0).to(dtype)
    return rows.unsqueeze(1)
