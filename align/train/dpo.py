"""DPO stage, Llama 3 style: formatting tokens masked, 0.2 NLL on chosen, cached reference, shared prompt.

Each preference record is one row: the prompt once, then its responses (exact block mask), and the LM
head runs on response positions only (``TokenLogps``). The reference log-probs are computed once before
training and cached on disk (``align.train.reference``), so training runs the policy only.

Simplifications: records whose prompt alone fills ``max_length`` are dropped (counted in the metrics);
responses are cut at ``max_length`` (prompt + response; counted). Pairs whose two responses are identical
(same ids once tokenized and cut) carry no preference: they are dropped, counted and warned about. The
start-of-training reward accuracy and margin are computed with the policy before its first step, i.e. 0
when the reference is the policy's start.
"""

from __future__ import annotations

from align.config.base import Artifact
from align.config.dpo import DPOStage
from align.data.chat import formatting_token_ids
from align.data.collate import epoch_order, group_by_count, group_by_length, length_sorted_groups
from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
from align.data.sources import describe_sources
from align.losses.dpo import dpo_loss, response_sums, response_token_counts
from align.models.loading import count_parameters, save_checkpoint
from align.models.logps import TokenLogps
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import evaluate_sums, load_policy, make_accelerator, plan_epochs
from align.train.loop import make_plan, train
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.reference import reference_logps
from align.train.sharded import full_state_dict
from align.train.snapshots import snapshot_saver


def make_loss_fn(beta: float, nll_weight: float, label_smoothing: float):
    """``loss_fn(model, batch) -> (loss summed over pairs, metric sums)`` for the training loop."""

    def loss_fn(model, batch):
        logps = model(*batch.model_inputs())  # (N,) log-probs of the response tokens
        owner, n_resp = batch.tokens.owner, batch.num_responses
        masked = response_sums(logps, owner, n_resp, batch.dpo_mask)  # (R,) formatting tokens left out
        nll = -response_sums(logps, owner, n_resp) / response_token_counts(owner, n_resp)  # (R,) all tokens
        ref = batch.ref_logps
        loss, stats = dpo_loss(
            masked[batch.chosen], masked[batch.rejected], ref[batch.chosen], ref[batch.rejected],
            nll[batch.chosen], beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing,
        )
        # the policy's own preference, defined before training too (the implicit reward is 0 at the start):
        # the chosen response has the higher mean token log-prob (no reference, no length advantage)
        stats["logp_accuracy"] = (nll[batch.chosen] < nll[batch.rejected]).float().sum().detach()
        return loss, stats

    return loss_fn


def pair_count(batch) -> float:
    return float(batch.num_pairs)


def run(stage: DPOStage, ctx: StageContext) -> StageResult:
    """1. accelerator and seed  2. policy and tokenizer  3. preference data, tokenized with the DPO mask
    4. reference log-probs (cache or one pass)  5. plan  6. score pairs at the start  7. train
    8. score pairs at the end  9. save the HF checkpoint."""
    cfg = stage.train
    # step 1
    accelerator = make_accelerator(cfg, ctx.seed)
    # step 2
    lm, tokenizer = load_policy(stage.model, ctx.model_path(stage.model), ctx.seed)
    # step 3
    paths = ctx.data_paths(stage.data, (Artifact.PREFERENCES,))
    train_records, eval_records = load_preferences(stage.data, paths, ctx.seed)
    formatting = _formatting_ids(tokenizer, stage.formatting_tokens)
    train_data = tokenize_preferences(tokenizer, train_records, formatting, cfg.max_length, stage.pairs)
    eval_data = tokenize_preferences(tokenizer, eval_records, formatting, cfg.max_length, stage.pairs)
    train_ex, eval_ex = train_data.examples, eval_data.examples
    sources = describe_sources(stage.data, paths)
    identical = train_data.identical_pairs + eval_data.identical_pairs
    if identical:
        all_pairs = identical + train_data.num_pairs + eval_data.num_pairs
        accelerator.print(
            f"[{stage.name}] warning: dropped {identical} of {all_pairs} preference pairs whose chosen and rejected "
            f"responses are identical (once tokenized and cut to max_length={cfg.max_length}; no preference "
            f"to learn) in {sources}"
        )
    if not train_ex:
        raise StageInputError(
            f"stage '{stage.name}': no training pair left in {sources}: of {len(train_records)} training "
            f"records, {train_data.dropped} have a prompt that fills max_length={cfg.max_length} and "
            f"{train_data.identical_records} have identical chosen and rejected responses"
        )
    # step 4
    (train_ref, eval_ref), ref_info = reference_logps(stage, ctx, lm, tokenizer, (train_ex, eval_ex), accelerator)
    # step 5
    per_step = cfg.grad_accum * accelerator.num_processes

    lengths = [len(ex) for ex in train_ex]

    def epoch_groups(epoch):
        order = epoch_order(len(train_ex), ctx.seed, epoch)
        if cfg.group_by_length:
            return group_by_length(order, lengths, cfg.batch_size, ctx.seed, epoch)
        return group_by_count(order, cfg.batch_size)

    plan = make_plan(epoch_groups, cfg.epochs, per_step, cfg.max_steps)
    epochs_trained, epochs_note = plan_epochs(cfg, len(plan), len(epoch_groups(0)), per_step)
    model = TokenLogps(lm)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(plan))
    model, optimizer = accelerator.prepare(model, optimizer)
    dtype = next(lm.parameters()).dtype

    def batcher(examples, refs):
        def make_batch(group):
            batch = collate_pairs([examples[i] for i in group], tokenizer.pad_token_id, dtype,
                                  [refs[i] for i in group])
            return batch.to(accelerator.device)
        return make_batch

    loss_fn = make_loss_fn(stage.beta, stage.nll_weight, stage.label_smoothing)
    train_groups = length_sorted_groups(lengths[: stage.metrics_records], cfg.batch_size)
    eval_groups = length_sorted_groups([len(ex) for ex in eval_ex], cfg.batch_size)

    def score():
        out = {}
        for prefix, groups, examples, refs in (("train_pairs", train_groups, train_ex, train_ref),
                                               ("eval", eval_groups, eval_ex, eval_ref)):
            if groups:
                m = evaluate_sums(model, groups, batcher(examples, refs), loss_fn, pair_count, accelerator)
                out.update({f"{prefix}_{k.replace('rewards/', 'reward_').replace('/', '_')}": v for k, v in m.items()})
        return out

    # step 6
    start = score()
    logger = MetricsLogger(ctx.out_dir, cfg.report_to, accelerator.is_main_process, stage.name)
    logger.log(0, start, prefix="start")
    total, trainable = count_parameters(lm)
    accelerator.print(
        f"[{stage.name}] {len(train_ex)} train / {len(eval_ex)} eval records "
        f"({train_data.num_pairs} train pairs, {train_data.dropped + eval_data.dropped} records dropped: "
        f"prompt >= max_length, {train_data.truncated + eval_data.truncated} responses cut at "
        f"max_length={cfg.max_length}), {len(plan)} steps ({epochs_trained:.2f} epochs), "
        f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); reference log-probs "
        f"{'from cache' if ref_info['ref_cache_hit'] else 'computed'}"
    )
    if epochs_note:
        accelerator.print(f"[{stage.name}] {epochs_note}")
    # step 7
    summary = train(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, plan=plan,
        make_batch=batcher(train_ex, train_ref), loss_fn=loss_fn, units=pair_count, cfg=cfg,
        out_dir=ctx.out_dir, logger=logger, desc=stage.name,
        on_step=snapshot_saver(accelerator, cfg.snapshot_every, len(plan), ctx.out_dir,
                               lambda: accelerator.unwrap_model(model).lm, tokenizer),
    )
    # step 8
    end = score()
    logger.log(summary.steps, end, prefix="end")
    logger.close()
    metrics = {"train_loss_first": summary.first_loss, "train_loss_last": summary.last_loss,
               "steps": summary.steps, "train_tokens": summary.tokens, "train_padding": summary.padding, **ref_info,
               "dropped_records": float(train_data.dropped + eval_data.dropped),
               "identical_pairs_dropped": float(identical),
               "truncated_responses": float(train_data.truncated + eval_data.truncated),
               "epochs_trained": epochs_trained,
               "mask_id_fallbacks": float(train_data.id_fallbacks + eval_data.id_fallbacks),
               "boundary_adjusted": float(train_data.boundary_adjusted + eval_data.boundary_adjusted)}
    # the result keeps the headline numbers; metrics.jsonl has all of them (prefixes start/, train/, end/)
    headline = [k for k in end if k.endswith(_HEADLINE)]
    metrics.update({f"{k}_start": start[k] for k in headline})
    metrics.update({k: end[k] for k in headline})
    # step 9
    model_dir = ctx.output(Artifact.POLICY)
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model, "lm")  # every process (sharded training: the gather)
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model).lm, tokenizer, model_dir, state)
    accelerator.wait_for_everyone()
    return StageResult(metrics=metrics)


_HEADLINE = ("_reward_accuracy", "_reward_margin", "_dpo", "_nll", "_logp_accuracy")


def _formatting_ids(tokenizer, setting) -> frozenset[int]:
    if setting == "off":
        return frozenset()
    return formatting_token_ids(tokenizer, None if setting == "auto" else setting)
