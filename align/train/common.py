"""Helpers every trained stage shares: accelerator, seeds, model + tokenizer, evaluation of a summed loss."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from align.config.specs import ModelSpec, TrainConfig
from align.models.loading import load_causal_lm, load_tokenizer


def make_accelerator(cfg: TrainConfig, seed: int):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # torchrun without GPUs: accelerate sets up gloo (MULTI_CPU) only when told cpu=True; otherwise every
    # process trains alone on its own plan and all of them act as the main process.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    set_seed(seed)
    return accelerator


def load_policy(spec: ModelSpec, model_path: str, seed: int):
    tokenizer = load_tokenizer(spec, model_path)
    model = load_causal_lm(spec, model_path, tokenizer, seed=seed)
    return model, tokenizer


@torch.no_grad()
def evaluate_sum(
    model: torch.nn.Module,
    groups: Sequence[Sequence[int]],
    make_batch: Callable,
    loss_fn: Callable,
    units: Callable,
    accelerator=None,
) -> float:
    """Mean of a summed loss over ``groups`` of examples (unit-weighted, like training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for group in groups:
        batch = make_batch(group)
        ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            loss, _ = loss_fn(model, batch)
        total += float(loss)
        count += units(batch)
    model.train(was_training)
    return total / max(count, 1e-12)
