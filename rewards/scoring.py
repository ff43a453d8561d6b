"""Batch scoring of conversations with a reward model saved as an HF sequence-classification checkpoint.

Plain ``transformers``: ``AutoModelForSequenceClassification`` (one label) and ``AutoTokenizer`` from the
checkpoint folder, one right-padded row per (prompt, response), the score read by HF at the last
non-pad token. Token ids follow :mod:`rewards.encoding` (the same rule the reward_model stage trains
with; its truncation settings come from ``reward_stats.json`` when the folder has one).

    scorer = RewardScorer.from_pretrained("runs/x/round_1/rm_helpful/model")
    scores = scorer.score(prompts, responses, batch_size=16)   # raw (logit-scale) scores
    scorer.whiten(scores)                                      # (r - mean) / std, see rewards.whitening
    ModelReward(scorer)(prompts, responses)                    # the same, whitened, as a RewardFunction
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.encoding import encode_scored
from rewards.protocol import as_rewards
from rewards.whitening import RewardStats, whiten

if TYPE_CHECKING:
    import torch


class RewardScorer:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        stats: RewardStats | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ):
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
        if model.config.pad_token_id is None:
            raise ValueError("the reward model's config has no pad_token_id (HF needs it to find the last token)")
        self.model, self.tokenizer, self.stats = model.eval(), tokenizer, stats
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.boundary_adjusted = 0  # responses encoded apart from their prompt (merged at the text boundary)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None, dtype=None,
                        max_length: int | None = None) -> RewardScorer:
        """Load a checkpoint folder (or hub id). ``max_length``: overrides the saved truncation length."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or torch.float32)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        stats = RewardStats.load(path) if Path(path).is_dir() else None
        max_prompt_length = stats.max_prompt_length if stats else None
        if max_length is None and stats is not None:
            max_length = stats.max_length
        return cls(model.to(device), tokenizer, stats=stats, max_length=max_length,
                   max_prompt_length=max_prompt_length)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, prompt: Any, response: Any) -> list[int]:
        ids, split = encode_scored(self.tokenizer, prompt, response, self.max_length, self.max_prompt_length)
        self.boundary_adjusted += split
        return ids

    def score(self, prompts: Sequence[Any], responses: Sequence[Any], batch_size: int = 8) -> list[float]:
        """Raw scores of ``responses[i]`` to ``prompts[i]``.

        A prompt is a list of messages (dicts or ``data_schemas.Message``) ending with a user turn, or a
        string (one user turn); a response is a string, an assistant message, or a list holding one.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses, strict=True)], batch_size)

    def score_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """Raw scores of pre-tokenised rows (prompt + response ids, ending with the scored token)."""
        import torch

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        pad = self.model.config.pad_token_id
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths batch together
        scores = [0.0] * len(rows)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(rows[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                for k, i in enumerate(chunk):
                    ids[k, : len(rows[i])] = torch.tensor(rows[i])
                # right-padded rows under a causal model: no real token sees the padding after it, so no
                # mask is needed (SDPA's causal kernel); the score is read at the last non-pad token
                logits = self.model(input_ids=ids.to(self.device)).logits
                for k, i in enumerate(chunk):
                    scores[i] = float(logits[k, 0])
        return scores

    def whiten(self, scores):
        if self.stats is None:
            raise ValueError("this reward model has no reward_stats.json; whitening needs its mean and std")
        return whiten(scores, self.stats)


class ModelReward:
    """One reward model as a :class:`rewards.protocol.RewardFunction`: its raw scores, whitened with the
    model's saved statistics when ``whiten`` is set and the model has them (``reward_stats.json``)."""

    def __init__(self, scorer: RewardScorer, *, whiten: bool = True, batch_size: int = 16):
        self.scorer, self.whiten, self.batch_size = scorer, whiten, batch_size

    def __call__(self, prompts, responses, is_safety=None) -> torch.Tensor:
        raw = self.scorer.score(prompts, responses, batch_size=self.batch_size)
        return as_rewards(self.scorer.whiten(raw) if self.whiten and self.scorer.stats is not None else raw)
