"""DPO stage, Llama 3 style: formatting tokens masked, 0.2 NLL on chosen, cached reference, shared prompt.

A record is one row (prompt once, then its responses); reference log-probs computed once and cached; over-long
prompts and identical pairs dropped, responses cut (counted); pair metrics before (``*_start``) and after.
"""

from __future__ import annotations

from align.config.base import Artifact
from align.config.dpo import DPOStage
from align.data.chat import formatting_ids
from align.data.collate import length_sorted_groups
from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
from align.data.sources import describe_sources, mix_counts, split_by_prompt
from align.losses.dpo import dpo_loss, response_sums, response_token_counts
from align.models.logps import TokenLogps
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import evaluate_sums, load_policy
from align.train.fit import Built, Output, Task, fit, planned, shuffled_groups
from align.train.reference import reference_logps

HEADLINE = ("_reward_accuracy", "_reward_margin", "_dpo", "_nll", "_logp_accuracy")


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


class DPO(Task):
    stage: DPOStage

    def build(self) -> Built:
        stage, cfg, ctx = self.stage, self.stage.train, self.ctx
        paths = ctx.data_paths(stage.data, (Artifact.PREFERENCES,))
        train_records, eval_records = split_by_prompt(load_preferences(stage.data, paths, ctx.seed),
                                                      stage.data.eval_fraction, ctx.seed, stage.data.train_sample)
        self.mix = mix_counts(train_records)
        if not train_records:  # before the model: bad data stops at once
            raise StageInputError(f"stage '{stage.name}': data.eval_fraction={stage.data.eval_fraction} holds out "
                                  f"every prompt of {describe_sources(stage.data, paths)}: no training record is left")
        lm, self.tokenizer = load_policy(stage.model, ctx.model_path(stage.model), ctx.seed)
        formatting = formatting_ids(self.tokenizer, stage.formatting_tokens)
        self.data = [tokenize_preferences(self.tokenizer, records, formatting, cfg.max_length, stage.pairs)
                     for records in (train_records, eval_records)]
        (train, held_out), identical = self.data, self.data[0].identical_pairs + self.data[1].identical_pairs
        notes = [f"warning: dropped {identical} of {identical + train.num_pairs + held_out.num_pairs} preference "
                 f"pairs whose chosen and rejected responses are identical (once tokenized and cut to max_length="
                 f"{cfg.max_length}; no preference to learn) in {describe_sources(stage.data, paths)}"] if identical else []
        if not train.examples:
            raise StageInputError(
                f"stage '{stage.name}': no training pair left in {describe_sources(stage.data, paths)}: of "
                f"{len(train_records)} training records, {train.dropped} have a prompt that fills max_length="
                f"{cfg.max_length} and {train.identical_records} have identical chosen and rejected responses")
        reference = reference_logps(stage, ctx, lm, self.tokenizer, (train.examples, held_out.examples),
                                    self.accelerator)
        self.refs, self.trunks, self.ref_info = reference
        self.dtype, lengths = next(lm.parameters()).dtype, [len(e) for e in train.examples]
        self.source = planned(self.accelerator, cfg, shuffled_groups(lengths, cfg, ctx.seed), self._batcher(0))
        self.loss_fn = make_loss_fn(stage.beta, stage.nll_weight, stage.label_smoothing)
        self.scored = [length_sorted_groups(lengths[: stage.metrics_records], cfg.batch_size),
                       length_sorted_groups([len(e) for e in held_out.examples], cfg.batch_size)]
        return Built(TokenLogps(lm, int(self.ref_info["trunk_layers"])), self.source, self.loss_fn, pair_count,
                     [Output("lm", ctx.output(Artifact.POLICY), self.tokenizer)], self._banner(),
                     notes + self.source.notes, policy="lm", tokenizer=self.tokenizer, log_before="start",
                     log_after="end")

    def _banner(self) -> str:
        (train, held_out), max_length = self.data, self.stage.train.max_length
        return (f"{len(train.examples)} train / {len(held_out.examples)} eval records ({train.num_pairs} train "
                f"pairs, {train.dropped + held_out.dropped} records dropped: prompt >= max_length, "
                f"{train.truncated + held_out.truncated} responses cut at max_length={max_length}), "
                f"{self.source.words}; reference log-probs {'from cache' if self.ref_info['ref_cache_hit'] else 'computed'}"
                + (f", {int(self.ref_info['trunk_layers'])} frozen lower layers run once" if self.trunks else ""))

    def _batcher(self, split: int):
        examples, refs, pad = self.data[split].examples, self.refs[split], self.tokenizer.pad_token_id
        trunks = self.trunks[split] if self.trunks else None  # the frozen lower layers' states: run once
        return lambda group: collate_pairs([examples[i] for i in group], pad, self.dtype, [refs[i] for i in group],
                                           [trunks[i] for i in group] if trunks else None).to(self.accelerator.device)

    def evaluate(self) -> dict[str, float]:
        out = {}
        for split, prefix in ((0, "train_pairs"), (1, "eval")):
            if self.scored[split]:
                m = evaluate_sums(self.model, self.scored[split], self._batcher(split), self.loss_fn, pair_count,
                                  self.accelerator)
                out.update({f"{prefix}_{k.replace('rewards/', 'reward_').replace('/', '_')}": v for k, v in m.items()})
        return out

    def result(self, summary, before, after) -> dict:
        train, held_out = self.data
        headline = [k for k in after if k.endswith(HEADLINE)]
        return {**summary.metrics(), **self.ref_info, **self.mix, "epochs_trained": self.source.epochs,
                "dropped_records": float(train.dropped + held_out.dropped),
                "identical_pairs_dropped": float(train.identical_pairs + held_out.identical_pairs),
                "truncated_responses": float(train.truncated + held_out.truncated),
                "mask_id_fallbacks": float(train.id_fallbacks + held_out.id_fallbacks),
                "boundary_adjusted": float(train.boundary_adjusted + held_out.boundary_adjusted),
                **{f"{k}_start": before[k] for k in headline}, **{k: after[k] for k in headline}}


def run(stage: DPOStage, ctx: StageContext) -> StageResult:
    return fit(DPO(stage, ctx), stage.train, ctx)
