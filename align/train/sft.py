"""SFT stage: multi-turn chats, loss on assistant tokens (content + termination token) only.

The LM head runs on the scored positions only (see ``align.models.logps``); with ``packing`` examples are
laid end to end in rows of ``max_length`` (position ids restart per example, so attention never crosses
them): by default the whole epoch is packed best-fit into nearly full rows and ``batch_size`` rows make a
micro-batch (``packing_strategy: best_fit``, TRL's bfd), so little compute goes to padding
(``train_padding``).

Rows longer than ``max_length`` are cut (``truncated_rows``); a row left with no assistant token within
``max_length`` is dropped (``dropped_too_long``), as is one whose answers all have ``weight: 0``
(``dropped_weight_0``); all are counted in the metrics and the stage log.
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
from align.data.sources import describe_sources, load_sft, mix_counts, trained_split
from align.models.logps import TokenLogps
from align.runtime import StageContext, StageInputError, StageResult
from align.train.common import evaluate_sums, load_policy
from align.train.fit import Built, Output, Task, fit, planned


def sft_loss(model, batch):
    """Summed next-token NLL over the batch's scored (assistant) tokens; the loop divides by the
    global token count."""
    logps = model(*batch.model_inputs())  # (N,)
    return -logps.sum(), {}


def scored_tokens(batch) -> float:
    return float(batch.num_scored)


class SFT(Task):
    stage: SFTStage

    def build(self) -> Built:
        stage, cfg, ctx = self.stage, self.stage.train, self.ctx
        paths = ctx.data_paths(stage.data, (Artifact.SFT_RECORDS,))
        train_records, eval_records, untrained = trained_split(  # before the model: bad data stops at once
            *load_sft(stage.data, paths, ctx.seed, stage.system_prompt), stage.data, describe_sources(stage.data, paths),
            stage.name)
        lm, self.tokenizer = load_policy(stage.model, ctx.model_path(stage.model), ctx.seed)
        train_ex, self.eval_ex = self._tokenize(train_records), self._tokenize(eval_records)
        truncated, n_rows = sum(e.cut > 0 for e in train_ex + self.eval_ex), len(train_ex) + len(self.eval_ex)
        self.train_ex = [e for e in train_ex if any(e.loss_mask[1:])]
        self.eval_ex = [e for e in self.eval_ex if any(e.loss_mask[1:])]
        self.counts = {**mix_counts(train_records), "truncated_rows": float(truncated),
                       "dropped_too_long": float(n_rows - len(self.train_ex) - len(self.eval_ex)),
                       "dropped_weight_0": float(untrained)}
        notes = [f"{truncated} of {n_rows} rows cut at max_length={cfg.max_length}; {self.counts['dropped_too_long']:.0f}"
                 " of them dropped: no assistant token left within max_length"] if truncated else []
        notes += [f"{untrained} rows dropped: every answer has weight 0 (nothing to train on)"] if untrained else []
        if not self.train_ex:
            raise StageInputError(f"stage '{stage.name}': no training row of {describe_sources(stage.data, paths)} "
                                  f"has an assistant token within max_length={cfg.max_length}")
        self.source = planned(self.accelerator, cfg, self._epoch_groups, self._train_batch)
        return Built(TokenLogps(lm), self.source, sft_loss, scored_tokens,
                     [Output("lm", ctx.output(Artifact.POLICY), self.tokenizer)],
                     f"{len(self.train_ex)} train / {len(self.eval_ex)} eval examples, {self.source.words}",
                     notes + self.source.notes,
                     policy="lm", tokenizer=self.tokenizer)

    def _tokenize(self, records):
        return [tokenize_chat(self.tokenizer, r.conversation(), self.stage.train.max_length) for r in records]

    def _epoch_groups(self, epoch):
        cfg, seed, lengths = self.stage.train, self.ctx.seed, [len(e) for e in self.train_ex]
        order = epoch_order(len(self.train_ex), seed, epoch)
        if self.stage.packing and self.stage.packing_strategy == "best_fit":  # micro-batch -> rows -> examples
            return group_packed_rows(order, lengths, cfg.max_length, cfg.batch_size, seed, epoch)
        if self.stage.packing:
            return group_by_tokens(order, lengths, cfg.batch_size * cfg.max_length)
        return group_by_count(order, cfg.batch_size)

    def _batch(self, examples, rows=None):
        pad, max_length = self.tokenizer.pad_token_id, self.stage.train.max_length
        if self.stage.packing:
            return collate_packed(examples, max_length, pad, rows).to(self.accelerator.device)
        return collate_padded(examples, pad).to(self.accelerator.device)

    def _train_batch(self, group):
        if self.stage.packing and self.stage.packing_strategy == "best_fit":  # the rows are chosen: lay them out
            flat = [i for row in group for i in row]
            at = {i: k for k, i in enumerate(flat)}
            return self._batch([self.train_ex[i] for i in flat], [[at[i] for i in row] for row in group])
        return self._batch([self.train_ex[i] for i in group])

    def evaluate(self) -> dict[str, float]:
        if not self.eval_ex:
            return {}
        groups = group_by_count(list(range(len(self.eval_ex))), self.stage.train.batch_size)
        return {"loss": evaluate_sums(self.model, groups, lambda g: self._batch([self.eval_ex[i] for i in g]),
                                      sft_loss, scored_tokens, self.accelerator)["loss"]}

    def result(self, summary, before, after) -> dict:
        metrics = {**summary.metrics(), "epochs_trained": self.source.epochs, **self.counts}
        if after:
            metrics.update(eval_loss_before=before["loss"], eval_loss=after["loss"])
        return metrics


def run(stage: SFTStage, ctx: StageContext) -> StageResult:
    return fit(SFT(stage, ctx), stage.train, ctx)
