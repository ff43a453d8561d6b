"""The one no-grad pass every stage uses to score, evaluate or compute reference values."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def causal_only(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when every row of the (B, T) padding mask is right-padded (real tokens, then padding), else the
    mask. Under a causal model a real token never sees the padding after it, so such rows need no mask: the
    model then runs SDPA's causal kernel (which skips the masked half and builds no (B, T, T) mask) and the
    outputs at real positions are the same; only the padding positions' outputs (read by nothing) change."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    prefix = torch.arange(m.size(1), device=m.device) < m.sum(dim=1, keepdim=True)
    return None if bool((m == prefix).all()) else attention_mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off for the block; the model's train/eval mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def no_grad_map(
    model: torch.nn.Module,
    groups: Iterable[Any],
    make_batch: Callable[[Any], Any],
    fn: Callable[[torch.nn.Module, Any], Any],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[tuple[Any, Any]]:
    """``(batch, fn(model, batch))`` for the batch of each group, without gradients, in eval mode, under
    ``autocast`` (e.g. ``accelerator.autocast``). Lazy: one batch in memory at a time."""
    with torch.no_grad(), eval_mode(model):
        for group in groups:
            batch = make_batch(group)
            with autocast():
                out = fn(model, batch)
            yield batch, out
