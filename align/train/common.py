"""Helpers every trained stage shares: accelerator, seeds, model + tokenizer, evaluation of a summed loss."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from align.config.specs import ModelSpec, TrainConfig
from align.models.inference import no_grad_map
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


def evaluate_sums(
    model: torch.nn.Module,
    groups: Sequence[Sequence[int]],
    make_batch: Callable,
    loss_fn: Callable,
    units: Callable,
    accelerator,
) -> dict[str, float]:
    """Held-out ``loss`` and every stat of ``loss_fn`` (sums over units, like training) as means over the
    units of ``groups``, without gradients; the same numbers the training loop logs, on other data."""
    total, sums, count = 0.0, {}, 0.0
    for batch, (loss, stats) in no_grad_map(model, groups, make_batch, loss_fn, accelerator.autocast):
        total += float(loss)
        count += units(batch)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    denominator = max(count, 1e-12)
    return {"loss": total / denominator, **{k: v / denominator for k, v in sums.items()}}


def plan_epochs(cfg: TrainConfig, plan_steps: int, micro_per_epoch: int, per_step: int) -> tuple[float, str | None]:
    """-> (passes over the data that ``plan_steps`` optimizer steps of ``per_step`` micro-batches make, with
    ``micro_per_epoch`` micro-batches in one epoch; a line for the stage log when ``max_steps`` overrode
    ``epochs`` (None when it did not)). ``by_epochs`` repeats ``align.train.loop.make_plan``'s count."""
    trained = plan_steps * per_step / micro_per_epoch
    by_epochs = max(1, math.floor(cfg.epochs * micro_per_epoch) // per_step)
    if cfg.max_steps is None or cfg.max_steps == by_epochs:
        return trained, None
    relation = ">" if cfg.max_steps > by_epochs else "<"
    return trained, (
        f"max_steps={cfg.max_steps} {relation} {cfg.epochs:g} epoch{'' if cfg.epochs == 1 else 's'} = "
        f"{by_epochs} step{'' if by_epochs == 1 else 's'}: training {trained:.2f} epochs (max_steps overrides epochs)"
    )
