"""SFT stage: multi-turn chats, loss on assistant tokens (content + termination token) only.

The LM head runs on the scored positions only (see ``align.models.logps``); with ``packing`` examples are
laid end to end in rows of ``max_length`` (position ids restart per example, so attention never crosses
them): by default the whole epoch is packed best-fit into nearly full rows and ``batch_size`` rows make a
micro-batch (``packing_strategy: best_fit``, TRL's bfd), so little compute goes to padding
(``train_padding``).

Rows longer than ``max_length`` are cut (``truncated_rows``); a row left with no assistant token within
``max_length`` has nothing to learn and is dropped (``dropped_too_long``); both are counted in the metrics
and the stage log.
"""

from __future__ import annotations

from align.config.base import Artifact
from align.config.sft import SFTStage
from align.data.chat import tokenize_chat
from align.data.collate import (
    collate_packed,
    collate_padded,
    epoch_order,
    group_by_count,
    group_by_tokens,
    group_packed_rows,
)
from align.data.sources import describe_sources, load_sft
from align.models.loading import count_parameters, save_checkpoint
from align.models.logps import TokenLogps
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import evaluate_sums, load_policy, make_accelerator, plan_epochs
from align.train.loop import make_plan, train
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.sharded import full_state_dict
from align.train.snapshots import snapshot_saver


def sft_loss(model, batch):
    """Summed next-token NLL over the batch's scored (assistant) tokens; the loop divides by the
    global token count."""
    logps = model(*batch.model_inputs())  # (N,)
    return -logps.sum(), {}


def scored_tokens(batch) -> float:
    return float(batch.num_scored)


def run(stage: SFTStage, ctx: StageContext) -> StageResult:
    """1. accelerator and seed  2. model and tokenizer  3. data, tokenized  4. plan  5. train
    6. held-out loss  7. save the HF checkpoint."""
    cfg = stage.train
    # step 1
    accelerator = make_accelerator(cfg, ctx.seed)
    # step 2
    lm, tokenizer = load_policy(stage.model, ctx.model_path(stage.model), ctx.seed)
    # step 3
    paths = ctx.data_paths(stage.data, (Artifact.SFT_RECORDS,))
    train_records, eval_records = load_sft(stage.data, paths, ctx.seed, stage.system_prompt)
    train_ex = [tokenize_chat(tokenizer, r.conversation(), cfg.max_length) for r in train_records]
    eval_ex = [tokenize_chat(tokenizer, r.conversation(), cfg.max_length) for r in eval_records]
    truncated = sum(e.cut > 0 for e in train_ex + eval_ex)
    n_rows = len(train_ex) + len(eval_ex)
    train_ex = [e for e in train_ex if any(e.loss_mask[1:])]
    eval_ex = [e for e in eval_ex if any(e.loss_mask[1:])]
    too_long = n_rows - len(train_ex) - len(eval_ex)
    if truncated:
        accelerator.print(
            f"[{stage.name}] {truncated} of {n_rows} rows cut at max_length={cfg.max_length}; {too_long} of them "
            "dropped: no assistant token left within max_length"
        )
    if not train_ex:
        raise StageInputError(
            f"stage '{stage.name}': no training row of {describe_sources(stage.data, paths)} has an assistant "
            f"token within max_length={cfg.max_length}"
        )
    lengths = [len(e) for e in train_ex]
    # step 4
    token_budget = cfg.batch_size * cfg.max_length

    best_fit = stage.packing and stage.packing_strategy == "best_fit"
    per_step = cfg.grad_accum * accelerator.num_processes

    def epoch_groups(epoch):
        order = epoch_order(len(train_ex), ctx.seed, epoch)
        if best_fit:  # micro-batch -> rows -> examples
            return group_packed_rows(order, lengths, cfg.max_length, cfg.batch_size, ctx.seed, epoch)
        if stage.packing:
            return group_by_tokens(order, lengths, token_budget)
        return group_by_count(order, cfg.batch_size)

    plan = make_plan(epoch_groups, cfg.epochs, per_step, cfg.max_steps)
    epochs_trained, epochs_note = plan_epochs(cfg, len(plan), len(epoch_groups(0)), per_step)

    def batch_of(examples):
        if stage.packing:
            return collate_packed(examples, cfg.max_length, tokenizer.pad_token_id)
        return collate_padded(examples, tokenizer.pad_token_id)

    def make_train_batch(group):
        if best_fit:  # the rows are chosen: lay them out as they are
            flat = [i for row in group for i in row]
            at = {i: k for k, i in enumerate(flat)}
            rows = [[at[i] for i in row] for row in group]
            return _to(collate_packed([train_ex[i] for i in flat], cfg.max_length, tokenizer.pad_token_id, rows),
                       accelerator.device)
        return _to(batch_of([train_ex[i] for i in group]), accelerator.device)

    # step 5
    model = TokenLogps(lm)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(plan))
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_groups = group_by_count(list(range(len(eval_ex))), cfg.batch_size)

    def make_eval_batch(group):
        return _to(batch_of([eval_ex[i] for i in group]), accelerator.device)

    def held_out_loss():
        if not eval_ex:
            return None
        return evaluate_sums(model, eval_groups, make_eval_batch, sft_loss, scored_tokens, accelerator)["loss"]

    eval_before = held_out_loss()
    logger = MetricsLogger(ctx.out_dir, cfg.report_to, accelerator.is_main_process, stage.name)
    total, trainable = count_parameters(lm)
    accelerator.print(
        f"[{stage.name}] {len(train_ex)} train / {len(eval_ex)} eval examples, {len(plan)} steps "
        f"({epochs_trained:.2f} epochs), {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)"
    )
    if epochs_note:
        accelerator.print(f"[{stage.name}] {epochs_note}")
    summary = train(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, plan=plan,
        make_batch=make_train_batch, loss_fn=sft_loss, units=scored_tokens, cfg=cfg,
        out_dir=ctx.out_dir, logger=logger, desc=stage.name,
        on_step=snapshot_saver(accelerator, cfg.snapshot_every, len(plan), ctx.out_dir,
                               lambda: accelerator.unwrap_model(model).lm, tokenizer),
    )
    # step 6
    eval_after = held_out_loss()
    metrics = {"train_loss_first": summary.first_loss, "train_loss_last": summary.last_loss,
               "steps": summary.steps, "train_tokens": summary.tokens, "train_padding": summary.padding, "epochs_trained": epochs_trained,
               "truncated_rows": float(truncated), "dropped_too_long": float(too_long)}
    if eval_after is not None:
        metrics.update(eval_loss_before=eval_before, eval_loss=eval_after)
        logger.log(summary.steps, {"loss": eval_after}, prefix="eval")
    logger.close()
    # step 7
    model_dir = ctx.output(Artifact.POLICY)
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model, "lm")  # every process (sharded training: the gather)
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model).lm, tokenizer, model_dir, state)
    accelerator.wait_for_everyone()
    return StageResult(metrics=metrics)


def _to(batch, device):
    for name in ("input_ids", "position_ids", "attention_mask", "index", "targets", "example_ids"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.to(device))
    return batch
