"""The training loop on accelerate: functions, no Trainer class.

Loss reduction: every stage's loss is a SUM over its units (tokens for SFT, pairs for DPO, ...) and the
loop divides by the unit count of the whole optimizer step across all micro-batches and all processes.
So 1 micro-batch of 8, 8 micro-batches of 1, and 2 processes x 4 give the same gradient: the mean over
the global batch. (DDP averages gradients over processes, hence the extra factor ``world``.)

The pieces, for any stage:

- :func:`optimizer_step`: one optimizer step over this process's micro-batches (accumulation without
  gradient sync until the last, the global-unit reduction above, clipping, scheduler) -> its metrics;
- :class:`Checkpoints`: save and resume the accelerator state plus a small JSON loop state (with the LR
  scheduler's state), keyed so a checkpoint made for other work is ignored. Weights are safetensors, the
  optimizer and RNG states are loaded with ``weights_only=True`` (tensors and plain data only: nothing
  else is unpickled, and a checkpoint holding accelerate's pickled custom state is refused); a damaged
  checkpoint is found before anything is loaded and an older one is used;
- :func:`train`: the supervised loop built from them. Its data order is a plan fixed up front from the
  seed: ``plan[step]`` lists the micro-batches of that step for all processes (process r takes its
  slice); resuming at step s continues at ``plan[s]``. A stage that makes its batches as it goes (PPO's
  rollouts) calls ``optimizer_step`` and ``Checkpoints`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config.specs import TrainConfig
from align.runtime import StageInputError, StageStopped
from align.train.checkpoints import Checkpoints
from align.train.collective import global_sum
from align.train.metrics import MetricsLogger

__all__ = ["Checkpoints", "TrainSummary", "global_sum", "make_plan", "optimizer_step", "plan_hash",
           "progress_bar", "train"]

Plan = list[list[list[int]]]  # step -> micro-batch -> example indices


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    tokens: int
    seconds: float
    padding: float | None = None  # share of the token slots of this run's steps that were padding


def make_plan(
    epoch_groups: Callable[[int], list[list[int]]], epochs: float, per_step: int, max_steps: int | None
) -> Plan:
    """Cut the micro-batches of successive epochs into optimizer steps of ``per_step`` micro-batches
    (``grad_accum * num_processes``). Incomplete trailing steps are dropped."""
    first = epoch_groups(0)
    total_micro = int(math.floor(epochs * len(first)))
    n_steps = max(1, total_micro // per_step)
    if max_steps is not None:
        n_steps = max_steps
    if len(first) < per_step:
        raise StageInputError(
            f"one optimizer step needs {per_step} micro-batches (grad_accum x processes) but an epoch has "
            f"only {len(first)}; lower batch_size or grad_accum"
        )
    stream, epoch = list(first), 0
    while len(stream) < n_steps * per_step:
        epoch += 1
        stream += epoch_groups(epoch)
    return [stream[i * per_step : (i + 1) * per_step] for i in range(n_steps)]


def plan_hash(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]


def optimizer_step(
    accelerator, model, optimizer, scheduler, batches: Sequence[object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[object], float], max_grad_norm: float | None,
) -> dict[str, float]:
    """One optimizer step over this process's micro-batches ``batches``.

    ``loss_fn(model, batch) -> (loss_sum, stat_sums)`` returns SUMS over the batch's units; ``units(batch)``
    is that count, known before the forward pass. Gradients are of the mean over the units of the whole
    step on all processes. -> ``loss`` and every stat as that mean, ``lr`` (of this step), ``grad_norm``
    (before clipping), ``tokens`` (all processes), ``tokens_per_s``.
    """
    t0 = time.perf_counter()
    world = accelerator.num_processes
    global_units = global_sum(accelerator, sum(units(b) for b in batches))
    denominator = max(global_units, 1e-12)
    scale = world / denominator  # DDP averages gradients over processes
    loss_sum, sums, local_tokens, local_slots = 0.0, {}, 0, 0
    for j, batch in enumerate(batches):
        sync = j == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            loss, stats = loss_fn(model, batch)
            accelerator.backward(loss * scale)
        loss_sum += float(loss.detach())
        local_tokens += int(getattr(batch, "num_tokens", 0))
        local_slots += int(getattr(batch, "padded_tokens", 0))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    _check_finite(accelerator, loss_sum, grad_norm, lr)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(global_sum(accelerator, local_tokens))
    metrics = {"loss": global_sum(accelerator, loss_sum) / denominator, "lr": lr}
    for k in sorted(sums):
        metrics[k] = global_sum(accelerator, sums[k]) / denominator
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    metrics["tokens"] = tokens
    if batches and hasattr(batches[0], "padded_tokens"):  # batches that know their padded size (same on every process)
        slots = global_sum(accelerator, local_slots)
        metrics["padding"] = 1.0 - tokens / max(slots, 1)
        metrics["slots"] = int(slots)
    metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
    return metrics


class TrainingDiverged(StageStopped):
    """The loss or the gradient stopped being finite: the step is not taken and nothing is saved."""


def _check_finite(accelerator, loss_sum: float, grad_norm: float | None, lr: float) -> None:
    """Stop before the optimizer applies a non-finite update (on every process alike)."""
    bad = not math.isfinite(loss_sum) or (grad_norm is not None and not math.isfinite(grad_norm))
    if accelerator.num_processes > 1:
        bad = global_sum(accelerator, float(bad)) > 0
    if bad:
        raise TrainingDiverged(
            f"training diverged: loss {loss_sum:.4g}, gradient norm {grad_norm} at learning rate {lr:.3g}; "
            "lower train.optim.lr (or check the data for empty targets)"
        )


def progress_bar(accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_main_process,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)


def train(
    *,
    accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    plan: Plan,
    make_batch: Callable[[Sequence[int]], object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[object], float],
    cfg: TrainConfig,
    out_dir: Path,
    logger: MetricsLogger,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
) -> TrainSummary:
    """Run ``plan`` (resuming from the latest checkpoint in ``out_dir/checkpoints`` if any), one
    :func:`optimizer_step` per entry."""
    checkpoints = Checkpoints(accelerator, Path(out_dir) / "checkpoints", plan_hash(plan), cfg.keep_checkpoints,
                              stateful={"scheduler": scheduler})
    state = checkpoints.resume(desc) or {}
    start, tokens_seen = state.get("step", 0), state.get("tokens", 0)
    slots_seen, slot_tokens = state.get("slots", 0), state.get("slot_tokens", 0)  # padding share: steps with slots
    first_loss, last_loss = state.get("first_loss"), None
    if start:
        logger.truncate_after(start)
        accelerator.print(f"[{desc}] resuming from {checkpoints.loaded.name} (step {start}/{len(plan)})")
    rank, accum = accelerator.process_index, cfg.grad_accum
    bar = progress_bar(accelerator, len(plan), start, desc)
    model.train()
    t_start = time.perf_counter()
    for step in range(start, len(plan)):
        batches = [make_batch(group) for group in plan[step][rank * accum : (rank + 1) * accum]]
        try:
            metrics = optimizer_step(accelerator, model, optimizer, scheduler, batches, loss_fn, units,
                                     cfg.optim.max_grad_norm)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"[{desc}] step {step + 1}/{len(plan)}: {err}") from None
        if "slots" in metrics:
            slots_seen += metrics.pop("slots")
            slot_tokens += metrics["tokens"]
        tokens_seen += metrics.pop("tokens")
        first_loss = metrics["loss"] if first_loss is None else first_loss
        last_loss = metrics["loss"]
        done = step + 1
        if done % cfg.log_every == 0 or done == len(plan):
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)  # drawn at tqdm's interval
        bar.update(1)
        if on_step is not None:  # before the checkpoint: a run resumed from it has had on_step(done)
            on_step(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < len(plan):
            checkpoints.save(done, {"tokens": tokens_seen, "slots": slots_seen, "slot_tokens": slot_tokens,
                                    "first_loss": first_loss})
    bar.close()
    return TrainSummary(
        steps=len(plan),
        resumed_from=start,
        first_loss=first_loss,
        last_loss=last_loss,
        tokens=tokens_seen,
        seconds=time.perf_counter() - t_start,
        padding=1.0 - slot_tokens / slots_seen if slots_seen else None,
    )
