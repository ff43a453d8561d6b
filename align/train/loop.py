"""The training loop on accelerate: functions, no Trainer class.

Loss reduction: every stage's loss is a SUM over its units (tokens for SFT, pairs for DPO, ...) and the
loop divides by the unit count of the whole optimizer step across all micro-batches and all processes.
So 1 micro-batch of 8, 8 micro-batches of 1, and 2 processes x 4 give the same gradient: the mean over
the global batch. (DDP averages gradients over processes, hence the extra factor ``world``.)

Data order is a plan fixed up front from the seed: ``plan[step]`` lists the micro-batches of that step
for all processes (process r takes its slice). Resuming at step s just continues at ``plan[s]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config.specs import TrainConfig
from align.train.metrics import MetricsLogger

Plan = list[list[list[int]]]  # step -> micro-batch -> example indices


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    tokens: int
    seconds: float


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
        raise ValueError(
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


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "loop_state.json").exists())
    return done[-1] if done else None


def save_checkpoint_state(accelerator, ckpt_root: Path, step: int, state: dict, keep: int) -> None:
    path = ckpt_root / f"step_{step:07d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # loop_state.json is written last: its presence marks the checkpoint complete.
        (path / "loop_state.json").write_text(json.dumps({"step": step, **state}))
        for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _global_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


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
    """Run ``plan`` (resuming from the latest checkpoint in ``out_dir/checkpoints`` if any).

    ``loss_fn(model, batch) -> (loss_sum, stat_sums)`` returns SUMS over the batch's units;
    ``units(batch)`` is that unit count, known before the forward pass.
    """
    from tqdm.auto import tqdm

    ckpt_root = Path(out_dir) / "checkpoints"
    fingerprint = plan_hash(plan)
    start, tokens_seen = 0, 0
    first_loss = last_loss = None
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        state = json.loads((last / "loop_state.json").read_text())
        if state.get("plan") == fingerprint:
            accelerator.load_state(str(last))
            start, tokens_seen = state["step"], state.get("tokens", 0)
            first_loss = state.get("first_loss")
            logger.truncate_after(start)
            accelerator.print(f"[{desc}] resuming from {last.name} (step {start}/{len(plan)})")
        else:
            accelerator.print(f"[{desc}] ignoring {last} (made by a different data plan)")

    rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.grad_accum
    bar = tqdm(
        total=len(plan), initial=start, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    model.train()
    t_start = time.perf_counter()
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        mine = plan[step][rank * accum : (rank + 1) * accum]
        batches = [make_batch(group) for group in mine]
        local_units = sum(units(b) for b in batches)
        global_units = _global_sum(accelerator, local_units)
        scale = world / max(global_units, 1e-12)
        loss_sum, sums, local_tokens = 0.0, {}, 0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss, stats = loss_fn(model, batch)
                accelerator.backward(loss * scale)
            loss_sum += float(loss.detach())
            local_tokens += int(getattr(batch, "num_tokens", 0))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = int(_global_sum(accelerator, local_tokens))
        tokens_seen += step_tokens
        metrics = {"loss": _global_sum(accelerator, loss_sum) / max(global_units, 1e-12), "lr": lr}
        for k in sorted(sums):
            metrics[k] = _global_sum(accelerator, sums[k]) / max(global_units, 1e-12)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics["tokens_per_s"] = step_tokens / max(time.perf_counter() - t0, 1e-9)
        first_loss = metrics["loss"] if first_loss is None else first_loss
        last_loss = metrics["loss"]
        done = step + 1
        if done % cfg.log_every == 0 or done == len(plan):
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < len(plan):
            state = {"plan": fingerprint, "tokens": tokens_seen, "first_loss": first_loss}
            save_checkpoint_state(accelerator, ckpt_root, done, state, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(done)
    bar.close()
    return TrainSummary(
        steps=len(plan),
        resumed_from=start,
        first_loss=first_loss,
        last_loss=last_loss,
        tokens=tokens_seen,
        seconds=time.perf_counter() - t_start,
    )
