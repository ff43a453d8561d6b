"""Attention within each sequence of a packed row, and nothing else: a varlen SDPA for any device.

A packed SFT row lays several examples end to end, position ids restarting at 0 for each. transformers
then builds a (B, 1, T, T) block-diagonal causal mask and runs SDPA with it: every row costs T x T
scores, most of them masked. Here, when the caller passes ``align_segments`` (each row's sequence
boundaries), the "sdpa" attention runs one causal SDPA per sequence instead (the kernel's causal path:
no mask, the upper triangle skipped): l x l / 2 scores for a sequence of l tokens. Exactly the same
attention; any other call (no ``align_segments``) goes to transformers' own SDPA unchanged.

``TokenLogps`` passes the boundaries for padding-free packed batches (``attention_mask`` None) of models
on the "sdpa" implementation; other implementations (eager, flash-attention) are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.compat import override_sdpa

SEGMENTS = "align_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """(B, T) position ids restarting at 0 for each packed sequence -> per row, the start of every
    sequence and then T: ``[0, s1, s2, ..., T]``."""
    t = position_ids.shape[1]
    starts = (position_ids == 0).nonzero().tolist()  # one host sync per forward pass
    bounds: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, col in starts:
        bounds[row].append(col)
    for row in bounds:
        if not row or row[0] != 0:
            row.insert(0, 0)
        row.append(t)
    return bounds


def _wrap(original):
    def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        bounds = kwargs.pop(SEGMENTS, None)
        if bounds is None:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        repeat = query.shape[1] // key.shape[1]  # grouped-query attention: one key/value head per group
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        p = dropout if module.training else 0.0
        rows = []
        for b, row in enumerate(bounds):
            rows.append(torch.cat([
                F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                               value[b : b + 1, :, s:e], dropout_p=p, is_causal=True, scale=scaling)
                for s, e in zip(row[:-1], row[1:], strict=True)
            ], dim=2))
        return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None

    return sdpa


def packed_kwargs(model, position_ids: torch.Tensor | None, attention_mask) -> dict:
    """``{align_segments: ...}`` for a padding-free packed batch of an SDPA model (installing the varlen
    attention once), else ``{}``."""
    config = getattr(model, "config", None)
    if attention_mask is not None or position_ids is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return {}
    override_sdpa(_wrap)
    return {SEGMENTS: segment_bounds(position_ids)}
