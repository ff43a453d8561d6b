"""DPO stage, Llama 3 style: formatting tokens masked, 0.2 NLL on chosen, cached reference, shared prompt.

Each preference record is one row: the prompt once, then its responses (exact block mask), and the LM
head runs on response positions only (``TokenLogps``). The reference log-probs are computed once before
training and cached on disk (``align.train.reference``), so training runs the policy only.

Simplifications: records whose prompt alone fills ``max_length`` are dropped (counted in the metrics);
responses are cut at ``max_length`` (prompt + response). The start-of-training reward accuracy and margin
are computed with the policy before its first step, i.e. 0 when the reference is the policy's start.
"""

from __future__ import annotations

from align.config.base import Artifact
from align.config.dpo import DPOStage
from align.data.chat import formatting_token_ids
from align.data.collate import epoch_order, group_by_count
from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
from align.losses.dpo import dpo_loss, response_sums, response_token_counts
from align.models.loading import count_parameters, save_checkpoint
from align.models.logps import TokenLogps
from align.runtime import StageContext, StageResult
from align.train.common import evaluate_sums, load_policy, make_accelerator
from align.train.loop import make_plan, train
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.reference import reference_logps


def make_loss_fn(beta: float, nll_weight: float, label_smoothing: float):
    """``loss_fn(model, batch) -> (loss summed over pairs, metric sums)`` for the training loop."""

    def loss_fn(model, batch):
        logps = model(*batch.model_inputs())  # (N,) log-probs of the response tokens
        owner, n_resp = batch.tokens.owner, batch.num_responses
        masked = response_sums(logps, owner, n_resp, batch.dpo_mask)  # (R,) formatting tokens left out
        nll = -response_sums(logps, owner, n_resp) / response_token_counts(owner, n_resp)  # (R,) all tokens
        ref = batch.ref_logps
        return dpo_loss(
            masked[batch.chosen], masked[batch.rejected], ref[batch.chosen], ref[batch.rejected],
            nll[batch.chosen], beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing,
        )

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
    train_records, eval_records = load_preferences(stage.data, ctx.data_paths(stage.data, (Artifact.PREFERENCES,)), ctx.seed)
    formatting = _formatting_ids(tokenizer, stage.formatting_tokens)
    train_data = tokenize_preferences(tokenizer, train_records, formatting, cfg.max_length, stage.pairs)
    eval_data = tokenize_preferences(tokenizer, eval_records, formatting, cfg.max_length, stage.pairs)
    train_ex, eval_ex = train_data.examples, eval_data.examples
    if not train_ex:
        raise ValueError(f"stage '{stage.name}': no preference record fits max_length={cfg.max_length}")
    # step 4
    (train_ref, eval_ref), ref_info = reference_logps(stage, ctx, lm, tokenizer, (train_ex, eval_ex), accelerator)
    # step 5
    plan = make_plan(
        lambda epoch: group_by_count(epoch_order(len(train_ex), ctx.seed, epoch), cfg.batch_size),
        cfg.epochs, cfg.grad_accum * accelerator.num_processes, cfg.max_steps,
    )
    model = TokenLogps(lm)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(plan))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    dtype = next(lm.parameters()).dtype

    def batcher(examples, refs):
        def make_batch(group):
            batch = collate_pairs([examples[i] for i in group], tokenizer.pad_token_id, dtype,
                                  [refs[i] for i in group])
            return batch.to(accelerator.device)
        return make_batch

    loss_fn = make_loss_fn(stage.beta, stage.nll_weight, stage.label_smoothing)
    train_groups = group_by_count(list(range(min(stage.metrics_records, len(train_ex)))), cfg.batch_size)
    eval_groups = group_by_count(list(range(len(eval_ex))), cfg.batch_size)

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
        f"({sum(len(e.pairs) for e in train_ex)} train pairs, {train_data.dropped + eval_data.dropped} dropped: "
        f"prompt >= max_length), {len(plan)} steps, {total / 1e6:.2f}M parameters "
        f"({trainable / 1e6:.2f}M trainable); reference log-probs "
        f"{'from cache' if ref_info['ref_cache_hit'] else 'computed'}"
    )
    # step 7
    summary = train(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, plan=plan,
        make_batch=batcher(train_ex, train_ref), loss_fn=loss_fn, units=pair_count, cfg=cfg,
        out_dir=ctx.out_dir, logger=logger, desc=stage.name,
    )
    # step 8
    end = score()
    logger.log(summary.steps, end, prefix="end")
    logger.close()
    metrics = {"train_loss_first": summary.first_loss, "train_loss_last": summary.last_loss,
               "steps": summary.steps, "train_tokens": summary.tokens, **ref_info,
               "dropped_records": float(train_data.dropped + eval_data.dropped),
               "mask_id_fallbacks": float(train_data.id_fallbacks + eval_data.id_fallbacks)}
    # the result keeps the headline numbers; metrics.jsonl has all of them (prefixes start/, train/, end/)
    headline = [k for k in end if k.endswith(_HEADLINE)]
    metrics.update({f"{k}_start": start[k] for k in headline})
    metrics.update({k: end[k] for k in headline})
    # step 9
    model_dir = ctx.output(Artifact.POLICY)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model).lm, tokenizer, model_dir)
    accelerator.wait_for_everyone()
    return StageResult(metrics=metrics)


_HEADLINE = ("_reward_accuracy", "_reward_margin", "_dpo", "_nll")


def _formatting_ids(tokenizer, setting) -> frozenset[int]:
    if setting == "off":
        return frozenset()
    return formatting_token_ids(tokenizer, None if setting == "auto" else setting)
