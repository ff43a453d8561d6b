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
- :func:`train`: the one training loop, built from them, over a batch **source**: a plan fixed up front
  from the seed (:class:`PlanSource`: ``plan[step]`` lists the micro-batches of that step for all
  processes, process r takes its slice; resuming at step s continues at ``plan[s]``), or a source that
  makes its batches as it goes and keeps its own resume state (PPO's rollouts, ``align.train.ppo``).
  Logging, progress, snapshots, checkpoints and resume are the loop's, whatever the source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from align.config.specs import TrainConfig
from align.runtime import StageInputError, StageStopped
from align.train.checkpoints import Checkpoints
from align.train.collective import global_sum
from align.train.metrics import MetricsLogger

__all__ = ["BatchSource", "Checkpoints", "PlanSource", "TrainSummary", "global_sum", "make_plan", "optimizer_step",
           "plan_hash", "progress_bar", "train"]

Plan = list[list[list[int]]]  # step -> micro-batch -> example indices
LOSS_WINDOW = 5  # steps whose losses the summary keeps at each end of the run (train.divergence)


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    first: dict | None  # the logged metrics of the run's first and last loop steps
    last: dict | None
    tokens: int
    seconds: float
    padding: float | None = None  # share of the token slots of this run's steps that were padding
    early: list[float] = field(default_factory=list)  # the losses of the first and last LOSS_WINDOW steps
    late: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return None if self.first is None else self.first["loss"]

    @property
    def last_loss(self) -> float | None:
        return None if self.last is None else self.last["loss"]

    def metrics(self) -> dict[str, float | None]:
        """The numbers every trained stage reports."""
        return {"train_loss_first": self.first_loss, "train_loss_last": self.last_loss, "steps": self.steps,
                "train_tokens": self.tokens, "train_padding": self.padding}


class BatchSource(Protocol):
    """Where the loop's batches come from: a fixed plan (:class:`PlanSource`) or a source that makes them as
    it goes (PPO's rollouts), which then owns a resume state of its own.

    ``steps`` loop steps (one logged row, checkpoint and snapshot boundary each) of ``optimizer_steps``
    optimizer steps in all; ``batches(step, model)`` yields, for each optimizer step of loop step ``step``,
    this process's micro-batches; ``summarize`` turns those steps' metrics into the logged row."""

    key: str  # what a checkpoint must have been made for to be resumed
    steps: int
    optimizer_steps: int

    def batches(self, step: int, model) -> Iterator[list[object]]: ...
    def summarize(self, step: int, step_metrics: list[dict]) -> dict[str, float]: ...
    def postfix(self, metrics: dict) -> dict[str, str]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


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


class PlanSource:
    """A plan fixed up front (SFT, RM, DPO): loop step ``i`` is one optimizer step over ``plan[i]``, of which
    this process takes its ``grad_accum`` micro-batches. Its resume state is the step alone."""

    def __init__(self, plan: Plan, make_batch: Callable[[Sequence[int]], object], rank: int, grad_accum: int):
        self.plan, self.make_batch, self.rank, self.accum = plan, make_batch, rank, grad_accum
        self.key = plan_hash(plan)
        self.steps = self.optimizer_steps = len(plan)

    def batches(self, step: int, model) -> Iterator[list[object]]:
        groups = self.plan[step][self.rank * self.accum : (self.rank + 1) * self.accum]
        yield [self.make_batch(group) for group in groups]

    def summarize(self, step: int, step_metrics: list[dict]) -> dict[str, float]:
        return step_metrics[0]

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                "tok_s": f"{metrics['tokens_per_s']:.0f}"}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class _Tally:
    """What the loop adds up over a run, kept in every checkpoint so a resumed run reports the whole run."""

    tokens: int = 0
    slots: int = 0  # token slots of the steps that know their padded size
    slot_tokens: int = 0  # real tokens of those steps
    first: dict | None = None  # the logged metrics of the first step
    early: list[float] = field(default_factory=list)  # the losses of the first and last LOSS_WINDOW steps
    late: list[float] = field(default_factory=list)

    def add(self, metrics: dict) -> None:
        if "slots" in metrics:
            self.slots += metrics.pop("slots")
            self.slot_tokens += metrics["tokens"]
        self.tokens += metrics.pop("tokens")
        self.first = dict(metrics) if self.first is None else self.first
        if "loss" in metrics:
            if len(self.early) < LOSS_WINDOW:
                self.early.append(float(metrics["loss"]))
            self.late = [*self.late, float(metrics["loss"])][-LOSS_WINDOW:]

    def state(self) -> dict:
        return {"tokens": self.tokens, "slots": self.slots, "slot_tokens": self.slot_tokens, "first": self.first,
                "early": self.early, "late": self.late}


def train(
    *, accelerator, model: torch.nn.Module, optimizer, scheduler, source: BatchSource,
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[object], float], cfg: TrainConfig, out_dir: Path, logger: MetricsLogger,
    desc: str = "train", on_step: Callable[[int], None] | None = None,
) -> TrainSummary:
    """Run ``source`` (resuming from the latest checkpoint in ``out_dir/checkpoints`` if any): for each loop
    step, one :func:`optimizer_step` per micro-batch list the source yields, then one logged row."""
    checkpoints = Checkpoints(accelerator, Path(out_dir) / "checkpoints", source.key, cfg.keep_checkpoints,
                              stateful={"scheduler": scheduler})
    state = checkpoints.resume(desc) or {}
    start = state.get("step", 0)
    tally = _Tally(**{k: state[k] for k in ("tokens", "slots", "slot_tokens", "first", "early", "late") if k in state})
    if start:
        source.load_state_dict(state.get("source", {}))
        logger.truncate_after(start)
        accelerator.print(f"[{desc}] resuming from {checkpoints.loaded.name} (step {start}/{source.steps})")
    bar = progress_bar(accelerator, source.steps, start, desc)
    model.train()
    t_start, last = time.perf_counter(), None
    for step in range(start, source.steps):
        step_metrics = []
        for batches in source.batches(step, model):
            try:
                step_metrics.append(optimizer_step(accelerator, model, optimizer, scheduler, batches, loss_fn,
                                                   units, cfg.optim.max_grad_norm))
            except TrainingDiverged as err:
                raise TrainingDiverged(f"[{desc}] step {step + 1}/{source.steps}: {err}") from None
        last = source.summarize(step, step_metrics)
        tally.add(last)
        done = step + 1
        if done % cfg.log_every == 0 or done == source.steps:
            logger.log(done, last)
        bar.set_postfix(**source.postfix(last), refresh=False)  # drawn at tqdm's interval
        bar.update(1)
        if on_step is not None:  # before the checkpoint: a run resumed from it has had on_step(done)
            on_step(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < source.steps:
            checkpoints.save(done, {**tally.state(), "source": source.state_dict()})
    bar.close()
    return TrainSummary(
        steps=source.steps, resumed_from=start, first=tally.first, last=last, tokens=tally.tokens,
        seconds=time.perf_counter() - t_start,
        padding=1.0 - tally.slot_tokens / tally.slots if tally.slots else None, early=tally.early, late=tally.late,
    )
