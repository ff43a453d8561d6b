"""Reward model stage: scalar head on a causal LM, ranking loss over 2+ responses per prompt.

A record is ONE row: the prompt once, then its ranked responses, each seeing the prompt and itself only
(``align.data.shared_prompt``); the loss is a mean over prompts (``align.losses.reward``). Writes an HF
``*ForSequenceClassification`` checkpoint with ``reward_stats.json`` (raw-score mean/std for whitening) and
``eval_scores.jsonl``; reports held-out accuracy by strength and domain (``eval.reward_accuracy``).
"""

from __future__ import annotations

import json
from pathlib import Path

from align.config.base import Artifact
from align.config.reward_model import RewardModelStage
from align.data.hygiene import apply_hygiene, select_domain
from align.data.preference import load_preferences
from align.data.ranking import (
    collate_ranked,
    encoding_counts,
    encoding_notes,
    tokenize_ranked_records,
    write_scored_records,
)
from align.data.sources import describe_sources, mix_counts, split_by_prompt
from align.losses.reward import reward_ranking_loss
from align.models.reward import PackedRewards, load_reward_model, load_reward_tokenizer, score_ranked
from align.models.trunk import shared_row_trunks, trunk_layers_to_keep
from align.runtime import StageContext, StageInputError, StageResult
from align.train.fit import Built, Output, Task, fit, planned, shuffled_groups
from eval.reward_accuracy import by_length_order, length_baseline, length_baseline_accuracy, ranking_accuracy
from rewards.whitening import compute_stats


def make_loss_fn(centering_coef: float):
    """``loss_fn(model, batch) -> (ranking loss summed over prompts, stat sums)``."""

    def loss_fn(model, batch):
        rewards = model(*batch.model_inputs())  # (R,)
        return reward_ranking_loss(rewards, batch.responses_per_prompt, batch.margins, centering_coef,
                                   reduction="sum")

    return loss_fn


def prompts_in(batch) -> float:
    return float(batch.num_prompts)


class RewardModel(Task):
    stage: RewardModelStage

    def build(self) -> Built:
        stage, cfg, ctx = self.stage, self.stage.train, self.ctx
        self.max_prompt_length = stage.max_prompt_length or cfg.max_length // 2
        path = ctx.model_path(stage.model)
        self.tokenizer = load_reward_tokenizer(stage.model, path)
        rm = load_reward_model(stage.model, path, self.tokenizer, seed=ctx.seed)
        self.dtype, notes = next(rm.parameters()).dtype, self._data()
        self.trunks, k = self._trunks(rm)
        self.source = planned(self.accelerator, cfg, shuffled_groups([len(e) for e in self.train_ex], cfg, ctx.seed),
                              self._batcher())
        banner = (f"{len(self.train_ex)} train / {len(self.eval_ex)} eval records ({sum(e.num_responses for e in self.train_ex)}"
                  f" train responses), {self.source.words}; hygiene: {self.hygiene}"
                  + (f"; {k} frozen lower layers run once per record" if k else ""))
        self.trunk_layers = k
        return Built(PackedRewards(rm, k), self.source, make_loss_fn(stage.centering_coef), prompts_in,
                     [Output("model", ctx.output(Artifact.REWARD_MODEL), self.tokenizer,
                             lambda folder: self.stats and self.stats.save(folder))], banner, notes + self.source.notes)

    def _trunks(self, rm) -> tuple[list | None, int]:
        """With LoRA on the top layers only: every record's states after the frozen layers below, computed
        once (for every epoch and evaluation: :mod:`align.models.trunk`) -> ([train, eval] or None, k)."""
        acc, examples = self.accelerator, (self.train_ex, self.eval_ex)
        k = trunk_layers_to_keep(rm, sum(len(e) for exs in examples for e in exs), acc.num_processes)
        if not k:
            return None, 0
        rm.to(acc.device)
        return [shared_row_trunks(rm, [e.row for e in exs], k, self.stage.train.batch_size,
                                  self.tokenizer.pad_token_id, acc.device, acc.autocast) for exs in examples], k

    def _batcher(self):
        train, trunks, pad = self.train_ex, self.trunks[0] if self.trunks else None, self.tokenizer.pad_token_id
        return lambda group: collate_ranked([train[i] for i in group], pad, self.dtype,
                                            [trunks[i] for i in group] if trunks else None).to(self.accelerator.device)

    def _data(self) -> list[str]:
        """Records: domain, split by prompt, hygiene, tokenized into packed rows -> the stage log's notes."""
        stage, cfg, ctx = self.stage, self.stage.train, self.ctx
        paths = ctx.data_paths(stage.data, (Artifact.PREFERENCES,))
        sources = describe_sources(stage.data, paths)
        records = select_domain(load_preferences(stage.data, paths, ctx.seed), stage.domain, stage.default_domain)
        train_records, eval_records = split_by_prompt(records, stage.data.eval_fraction, ctx.seed,
                                                      stage.data.train_sample)
        train_records, self.hygiene = apply_hygiene(train_records, stage.min_strength, stage.dedup_threshold)
        self.hygiene.update(mix_counts(train_records))
        if not train_records:
            raise StageInputError(f"stage '{stage.name}': no training record left after domain selection, the "
                                  "held-out split and hygiene (check domain / default_domain / min_strength)")
        data = [tokenize_ranked_records(self.tokenizer, r, cfg.max_length, self.max_prompt_length, stage.margin)
                for r in (train_records, eval_records)]
        if not data[0].examples:
            raise StageInputError(f"stage '{stage.name}': no training pair left in {sources}: the responses of each "
                                  f"of the {data[0].identical_records} training records are identical")
        (self.train_ex, self.eval_ex), self.eval_records = (d.examples for d in data), data[1].records
        self.hygiene.update(encoding_counts(data))
        return encoding_notes(data, train_records + eval_records, sources)

    def _scores(self, examples, trunks=None) -> list[list[float]]:
        return score_ranked(self.model, examples, self.stage.train.batch_size, self.tokenizer.pad_token_id,
                            self.accelerator.device, self.dtype, trunks)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_ex:
            return {}
        self.eval_scores = self._scores(self.eval_ex, self.trunks[1] if self.trunks else None)
        return ranking_accuracy(self.eval_scores, [e.strength for e in self.eval_ex], [e.domain for e in self.eval_ex])

    def result(self, summary, before, after) -> dict:
        stage, acc = self.stage, self.accelerator
        metrics = {**summary.metrics(), "train_records": len(self.train_ex), "eval_records": len(self.eval_ex),
                   "trunk_layers": self.trunk_layers,
                   "epochs_trained": self.source.epochs, **self.hygiene}
        if after:
            strengths = [e.strength for e in self.eval_ex]
            metrics.update(after, rm_accuracy_before=before.get("rm_accuracy"),
                           rm_accuracy_length_baseline=length_baseline_accuracy(self.eval_records),
                           **length_baseline(self.eval_records, strengths),
                           **by_length_order(self.eval_scores, self.eval_records),
                           **self._newest(self.eval_scores, "rm_newest_"), **self._compared())
            acc.print(f"[{stage.name}] held-out: " + json.dumps({k: round(v, 4) for k, v in after.items()}))
            if acc.is_main_process:
                write_scored_records(Path(self.ctx.out_dir) / "eval_scores.jsonl", self.eval_records, self.eval_scores)
        stats_ex, self.stats = self.train_ex[: stage.stats_records], None
        if stats_ex or self.eval_ex:  # stats_records: 0 and no held-out split: no reward_stats.json
            stats_trunks = self.trunks[0][: len(stats_ex)] if self.trunks else None
            flat = [s for rec in self._scores(stats_ex, stats_trunks) + (self.eval_scores if after else []) for s in rec]
            self.stats = compute_stats(flat, max_length=stage.train.max_length, max_prompt_length=self.max_prompt_length,
                                       extra={"records": len(stats_ex) + len(self.eval_ex), "stage": stage.name})
            metrics.update(reward_mean=self.stats.mean, reward_std=self.stats.std)
        return metrics

    def _newest(self, scores, prefix: str) -> dict[str, float]:
        """Accuracy on the held-out records annotated in this round (``meta.round``): the newest policy's."""
        mine = [s for s, r in zip(scores, self.eval_records, strict=True) if r.meta.get("round") == self.ctx.round]
        return {f"{prefix}accuracy": ranking_accuracy(mine)["rm_accuracy"], f"{prefix}records": len(mine)} if mine else {}

    def _compared(self) -> dict[str, float]:
        """``compare_with``'s accuracy on the same held-out records (tokenized with its own tokenizer)."""
        stage = self.stage
        path = self.ctx.ran(stage.compare_with, (Artifact.REWARD_MODEL,)) if stage.compare_with else None
        if path is None or not self.eval_records:
            return {}
        spec = stage.model.model_copy(update={"path": path, "from_stage": None, "tokenizer": None, "lora": None,
                                              "gradient_checkpointing": False})
        tokenizer = load_reward_tokenizer(spec, path)
        other = PackedRewards(load_reward_model(spec, path, tokenizer, seed=self.ctx.seed)).to(self.accelerator.device)
        data = tokenize_ranked_records(tokenizer, self.eval_records, stage.train.max_length, self.max_prompt_length,
                                       stage.margin)
        if len(data.records) != len(self.eval_records):
            raise StageInputError(f"stage '{stage.name}': compare_with {path} tokenizes the held-out records "
                                  "differently (its tokenizer makes some responses identical): compare models "
                                  "that share a tokenizer")
        scores = score_ranked(other.eval(), data.examples, stage.train.batch_size, tokenizer.pad_token_id,
                              self.accelerator.device, self.dtype)
        return {"compare_rm_accuracy": ranking_accuracy(scores)["rm_accuracy"], **self._newest(scores, "compare_rm_newest_")}


def run(stage: RewardModelStage, ctx: StageContext) -> StageResult:
    return fit(RewardModel(stage, ctx), stage.train, ctx)
