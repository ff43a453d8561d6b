"""Reward model stage: scalar head on a causal LM, ranking loss over 2+ responses per prompt.

Every record is ONE row: the prompt once, then all its ranked responses, each seeing the prompt and
itself only (``align.data.shared_prompt``); the head runs on each response's last token only. Several
records per micro-batch; the loss is a mean over prompts (``align.losses.reward``).

Outputs in ``model/``: an HF ``*ForSequenceClassification`` checkpoint (num_labels=1, pad id set) that
``rewards.scoring.RewardScorer`` or plain ``transformers`` load, and ``reward_stats.json`` (mean/std of
raw scores for whitening, and the truncation settings). ``eval_scores.jsonl``: held-out records with
their scores. Metrics: training loss, held-out accuracy overall / per strength / per domain, top-1
accuracy, mean margin (``eval.reward_accuracy``), hygiene counts (identical responses dropped, truncated
prompts and responses, with a warning line for identical responses), epochs trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.config.base import Artifact
from align.config.reward_model import RewardModelStage
from align.data.collate import epoch_order, group_by_count, group_by_length, length_sorted_groups
from align.data.preference import load_preferences
from align.data.ranking import apply_hygiene, collate_ranked, select_domain, tokenize_ranked_records
from align.data.sources import describe_sources, split_by_prompt
from align.losses.reward import reward_ranking_loss
from align.models.inference import no_grad_map
from align.models.loading import count_parameters, save_checkpoint
from align.models.reward import PackedRewards, load_reward_model, load_reward_tokenizer
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import make_accelerator, plan_epochs
from align.train.loop import make_plan, train
from align.train.metrics import MetricsLogger
from align.train.optim import build_optimizer, build_scheduler
from align.train.sharded import full_state_dict
from eval.reward_accuracy import length_baseline_accuracy, ranking_accuracy
from rewards.whitening import compute_stats


def prompts_in(batch) -> float:
    return float(batch.num_prompts)


def score_examples(model, examples, batch_size: int, pad_id: int, device, dtype=torch.float32):
    """Scores of every example's responses (best first), in order: list of lists of floats."""
    out = [None] * len(examples)

    def make_batch(group):
        return collate_ranked([examples[i] for i in group], pad_id, dtype).to(device)

    groups = length_sorted_groups([len(e) for e in examples], batch_size)
    for group, (batch, scores) in zip(groups, no_grad_map(model, groups, make_batch,
                                                         lambda m, b: m(*b.model_inputs())), strict=True):
        flat = scores.tolist()
        for i, n in zip(group, batch.responses_per_prompt, strict=True):
            out[i] = flat[:n]
            flat = flat[n:]
    return out


def run(stage: RewardModelStage, ctx: StageContext) -> StageResult:
    """1. accelerator and seed  2. tokenizer and reward model  3. records: domain, split by prompt, hygiene
    4. tokenize into packed rows  5. plan  6. train  7. held-out metrics  8. whitening stats and the
    HF checkpoint."""
    cfg = stage.train
    max_prompt_length = stage.max_prompt_length or cfg.max_length // 2
    # step 1
    accelerator = make_accelerator(cfg, ctx.seed)
    # step 2
    model_path = ctx.model_path(stage.model)
    tokenizer = load_reward_tokenizer(stage.model, model_path)
    rm = load_reward_model(stage.model, model_path, tokenizer, seed=ctx.seed)
    dtype = next(rm.parameters()).dtype
    # step 3
    whole = stage.data.model_copy(update={"eval_fraction": 0.0})
    paths = ctx.data_paths(stage.data, (Artifact.PREFERENCES,))
    sources = describe_sources(stage.data, paths)
    records, _ = load_preferences(whole, paths, ctx.seed)
    records = select_domain(records, stage.domain, stage.default_domain)
    train_records, eval_records = split_by_prompt(records, stage.data.eval_fraction, ctx.seed)
    train_records, hygiene = apply_hygiene(train_records, stage.min_strength, stage.dedup_threshold)
    if not train_records:
        raise StageInputError(f"stage '{stage.name}': no training record left after domain selection, the "
                              "held-out split and hygiene (check domain / default_domain / min_strength)")
    # step 4

    def tokenize(records):
        return tokenize_ranked_records(tokenizer, records, cfg.max_length, max_prompt_length, stage.margin)

    from rewards.encoding import BOUNDARY_SPLITS

    splits_before = BOUNDARY_SPLITS[0]
    train_data, eval_data = tokenize(train_records), tokenize(eval_records)
    boundary = BOUNDARY_SPLITS[0] - splits_before
    if boundary:
        accelerator.print(f"[{stage.name}] {boundary} responses merge with the prompt's last token when tokenized "
                          "together (e.g. leading spaces after ChatML's header): split at the text boundary")
    identical = train_data.identical_pairs + eval_data.identical_pairs
    if identical:
        all_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in train_records + eval_records)
        accelerator.print(
            f"[{stage.name}] warning: dropped {identical} of {all_pairs} ranked pairs whose two responses are "
            f"identical (once tokenized and truncated; no preference to learn; the worse-ranked copy goes) in "
            f"{sources}"
        )
    if not train_data.examples:
        raise StageInputError(f"stage '{stage.name}': no training pair left in {sources}: the responses of each of "
                              f"the {train_data.identical_records} training records are identical")
    train_ex, eval_ex, eval_records = train_data.examples, eval_data.examples, eval_data.records
    hygiene.update(identical_pairs_dropped=float(identical), boundary_adjusted=float(boundary),
                   truncated_prompts=float(train_data.truncated_prompts + eval_data.truncated_prompts),
                   truncated_responses=float(train_data.truncated_responses + eval_data.truncated_responses))
    # step 5
    per_step = cfg.grad_accum * accelerator.num_processes

    lengths = [len(e) for e in train_ex]

    def epoch_groups(epoch):
        order = epoch_order(len(train_ex), ctx.seed, epoch)
        if cfg.group_by_length:
            return group_by_length(order, lengths, cfg.batch_size, ctx.seed, epoch)
        return group_by_count(order, cfg.batch_size)

    plan = make_plan(epoch_groups, cfg.epochs, per_step, cfg.max_steps)
    epochs_trained, epochs_note = plan_epochs(cfg, len(plan), len(epoch_groups(0)), per_step)

    def make_train_batch(group):
        return collate_ranked([train_ex[i] for i in group], tokenizer.pad_token_id, dtype).to(accelerator.device)

    def rm_loss(model, batch):
        rewards = model(*batch.model_inputs())  # (R,)
        return reward_ranking_loss(rewards, batch.responses_per_prompt, batch.margins, stage.centering_coef,
                                   reduction="sum")

    # step 6
    model = PackedRewards(rm)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(plan))
    model, optimizer = accelerator.prepare(model, optimizer)

    def held_out():
        scores = score_examples(model, eval_ex, cfg.batch_size, tokenizer.pad_token_id, accelerator.device, dtype)
        return scores, ranking_accuracy(scores, [e.strength for e in eval_ex], [e.domain for e in eval_ex])

    accuracy_before = held_out()[1].get("rm_accuracy") if eval_ex else None
    logger = MetricsLogger(ctx.out_dir, cfg.report_to, accelerator.is_main_process, stage.name)
    total, trainable = count_parameters(rm)
    accelerator.print(
        f"[{stage.name}] {len(train_ex)} train / {len(eval_ex)} eval records "
        f"({sum(e.num_responses for e in train_ex)} train responses), {len(plan)} steps ({epochs_trained:.2f} "
        f"epochs), {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); hygiene: {hygiene}"
    )
    if epochs_note:
        accelerator.print(f"[{stage.name}] {epochs_note}")
    summary = train(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, plan=plan,
        make_batch=make_train_batch, loss_fn=rm_loss, units=prompts_in, cfg=cfg,
        out_dir=ctx.out_dir, logger=logger, desc=stage.name,
    )
    metrics = {"train_loss_first": summary.first_loss, "train_loss_last": summary.last_loss,
               "steps": summary.steps, "train_tokens": summary.tokens, "train_padding": summary.padding, "train_records": len(train_ex),
               "eval_records": len(eval_ex), "epochs_trained": epochs_trained, **hygiene}
    # step 7
    out_dir = Path(ctx.out_dir)
    eval_scores = []
    if eval_ex:
        eval_scores, accuracy = held_out()
        metrics.update(accuracy, rm_accuracy_before=accuracy_before,
                       rm_accuracy_length_baseline=length_baseline_accuracy(eval_records))
        logger.log(summary.steps, accuracy, prefix="eval")
        accelerator.print(f"[{stage.name}] held-out: " + json.dumps({k: round(v, 4) for k, v in accuracy.items()}))
        if accelerator.is_main_process:
            _write_eval_scores(out_dir / "eval_scores.jsonl", eval_records, eval_scores)
    logger.close()
    # step 8
    stats_ex = train_ex[: stage.stats_records]
    stats = None
    if stats_ex or eval_ex:  # stats_records: 0 and no held-out split: no reward_stats.json
        scored = score_examples(model, stats_ex, cfg.batch_size, tokenizer.pad_token_id, accelerator.device, dtype)
        flat = [s for rec in scored + eval_scores for s in rec]  # the held-out scores of step 7, not again
        stats = compute_stats(flat, max_length=cfg.max_length, max_prompt_length=max_prompt_length,
                              extra={"records": len(stats_ex) + len(eval_ex), "stage": stage.name})
        metrics.update(reward_mean=stats.mean, reward_std=stats.std)
    model_dir = ctx.output(Artifact.REWARD_MODEL)
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model, "model")  # every process (sharded training: the gather)
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model).model, tokenizer, model_dir, state)
        if stats is not None:
            stats.save(model_dir)
    accelerator.wait_for_everyone()
    return StageResult(metrics=metrics)


def _write_eval_scores(path: Path, records, scores) -> None:
    with path.open("w") as f:
        for record, s in zip(records, scores, strict=True):
            row = record.model_dump(mode="json", include={"prompt", "responses", "strength", "domain"})
            f.write(json.dumps({**row, "scores": s}) + "\n")
