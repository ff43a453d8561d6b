"""``fit``: the one skeleton of every trained stage; a stage says only what is particular to it (a ``Task``).

``fit(task, cfg, ctx)``: 1. accelerator and seed  2. ``task.build``: models, data and the batch source
3. optimizer, scheduler, ``accelerator.prepare``  4. held-out metrics before training  5. the loop
(``align.train.loop.train``: logging, progress, snapshots, checkpoints, resume)  6. the final checks
(``align.train.final_checks``: finite weights, ``train.divergence``; a failure stops the stage, nothing
saved)  7. held-out metrics after  8. the stage's metrics  9. the HF checkpoints (gathered on every
process, written by the main one).

A task is a small class: ``build`` returns a :class:`Built` (the module to train, its batch source, its
loss summed over its units and the unit count, what to save); ``evaluate`` its held-out numbers;
``result`` the stage's metrics from the loop's summary and the two evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.checksums import write_manifest
from align.config.specs import TrainConfig
from align.data.collate import epoch_order, group_by_count, group_by_length
from align.models.loading import count_parameters, save_checkpoint
from align.runtime import StageContext, StageResult
from align.train.common import make_accelerator, plan_epochs
from align.train.final_checks import check_trained, weight_norm
from align.train.loop import BatchSource, PlanSource, TrainSummary, make_plan, train
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.sharded import full_state_dict
from align.train.snapshots import snapshot_saver

LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]]


@dataclass
class Output:
    """One HF checkpoint a stage writes: the trained module's attribute ``attr`` (e.g. ``lm``) with
    ``tokenizer`` into ``folder``; ``extra(folder)`` writes what goes beside it (main process only)."""

    attr: str
    folder: Path
    tokenizer: object
    extra: Callable[[Path], None] | None = None


@dataclass
class Built:
    """What a task sets up before training."""

    module: torch.nn.Module  # what is trained (one module: DDP/FSDP see one forward)
    source: BatchSource
    loss_fn: LossFn  # (model, batch) -> (loss SUMMED over the batch's units, stat sums)
    units: Callable[[object], float]  # a batch's unit count, known before the forward pass
    outputs: list[Output]
    banner: str  # the line the stage prints before training (sizes, counts)
    notes: list[str] = field(default_factory=list)  # more lines for the stage log
    policy: str | None = None  # the attribute of ``module`` written as snapshots (``train.snapshot_every``)
    tokenizer: object = None  # the snapshots' tokenizer
    log_before: str | None = None  # metrics.jsonl prefix of the held-out numbers before training (None: not logged)
    log_after: str = "eval"  # and after
    loss_falls: bool = True  # a loss that must fall: train.divergence.max_loss_rise applies (not PPO's)


class Task:
    """A trained stage's particulars. Subclasses set ``build`` and, where they have them, ``evaluate`` and
    ``result``; ``self.accelerator`` and ``self.model`` (prepared) are set by :func:`fit`."""

    def __init__(self, stage, ctx: StageContext):
        self.stage, self.ctx = stage, ctx
        self.accelerator = self.model = None

    def build(self) -> Built:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out numbers of ``self.model`` (before and after training); none by default."""
        return {}

    def result(self, summary: TrainSummary, before: dict, after: dict) -> dict:
        """The stage's metrics (``result.json``)."""
        return {**summary.metrics(), **({f"{k}_before": v for k, v in before.items()}), **after}

    def close(self) -> None:
        """Release what ``build`` started (a generation engine)."""


def fit(task: Task, cfg: TrainConfig, ctx: StageContext) -> StageResult:
    """Train ``task`` with ``cfg`` into ``ctx.out_dir`` (steps in the module docstring)."""
    accelerator = task.accelerator = make_accelerator(cfg, ctx.seed)
    built = task.build()
    optimizer = build_optimizer(built.module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, built.source.optimizer_steps)
    model, optimizer = accelerator.prepare(built.module, optimizer)
    task.model = model
    name = task.stage.name
    start_norm = weight_norm(accelerator, model)
    before = task.evaluate()
    logger = MetricsLogger(ctx.out_dir, cfg.report_to, accelerator.is_main_process, name)
    if built.log_before and before:
        logger.log(0, before, prefix=built.log_before, replace=True)  # a resumed run: once
    total, trainable = count_parameters(built.module)
    accelerator.print(f"[{name}] {built.banner}, {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
    for note in built.notes:
        accelerator.print(f"[{name}] {note}")
    snapshot = None
    if built.policy is not None:
        snapshot = snapshot_saver(accelerator, cfg.snapshot_every, built.source.steps, ctx.out_dir,
                                  lambda: getattr(accelerator.unwrap_model(model), built.policy), built.tokenizer)
    summary = train(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                    source=built.source, loss_fn=built.loss_fn, units=built.units, cfg=cfg, out_dir=ctx.out_dir,
                    logger=logger, desc=name, on_step=snapshot)
    task.close()
    growth = check_trained(accelerator, model, summary, cfg, stage=name, start_norm=start_norm,
                           loss_falls=built.loss_falls)  # before anything is saved as the result
    after = task.evaluate()
    if after:
        logger.log(summary.steps, after, prefix=built.log_after)
    metrics = {**task.result(summary, before, after), "weight_growth": growth}
    logger.close()
    save_outputs(accelerator, model, built.outputs)
    return StageResult(metrics=metrics)


def save_outputs(accelerator, model, outputs: list[Output]) -> None:
    """Gather each output's full weights on every process (sharded training), write them on the main one."""
    accelerator.wait_for_everyone()
    for out in outputs:
        state = full_state_dict(accelerator, model, out.attr)  # a collective: every process, same order
        if accelerator.is_main_process:
            save_checkpoint(getattr(accelerator.unwrap_model(model), out.attr), out.tokenizer, out.folder, state)
            if out.extra is not None:
                out.extra(out.folder)
                write_manifest(out.folder)  # the files written beside the model are covered too
    accelerator.wait_for_everyone()


def planned(accelerator, cfg: TrainConfig, epoch_groups: Callable[[int], list], make_batch) -> PlanSource:
    """The plan of ``epoch_groups``' micro-batches cut into optimizer steps, as a batch source, with
    ``source.epochs`` (the passes over the data it makes), ``source.words`` (its length, for the banner) and
    ``source.notes`` (a line when ``max_steps`` overrode ``epochs``)."""
    per_step = cfg.grad_accum * accelerator.num_processes
    plan = make_plan(epoch_groups, cfg.epochs, per_step, cfg.max_steps)
    epochs, note = plan_epochs(cfg, len(plan), len(epoch_groups(0)), per_step)
    source = PlanSource(plan, make_batch, accelerator.process_index, cfg.grad_accum)
    source.epochs, source.words, source.notes = epochs, f"{len(plan)} steps ({epochs:.2f} epochs)", [note] if note else []
    return source


def shuffled_groups(lengths: list[int], cfg: TrainConfig, seed: int) -> Callable[[int], list[list[int]]]:
    """``epoch -> micro-batches`` of ``cfg.batch_size`` examples in a seeded order per epoch (similar
    lengths together when ``cfg.group_by_length``)."""

    def epoch_groups(epoch: int) -> list[list[int]]:
        order = epoch_order(len(lengths), seed, epoch)
        if cfg.group_by_length:
            return group_by_length(order, lengths, cfg.batch_size, seed, epoch)
        return group_by_count(order, cfg.batch_size)

    return epoch_groups
