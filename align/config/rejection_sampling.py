"""Rejection sampling: K samples per prompt from the current policy, the best (by reward) kept as SFT data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import DataSpec, ModelSpec, Strict
from align.config.stages import StageBase


class RewardSpec(Strict):
    """What scores the samples: one reward model, the Llama 2 Helpfulness + Safety combination, or a
    programmatic reward function (``gold``: the built-in world's judge, for controlled experiments)."""

    model: ModelSpec | None = Field(None, description="one reward model (a reward_model stage or a path)")
    helpful: ModelSpec | None = Field(None, description="the Helpfulness reward model (with 'safety')")
    safety: ModelSpec | None = Field(None, description="the Safety reward model (with 'helpful')")
    safety_threshold: float = Field(0.15, description="Llama 2: use the safety score when it is below this")
    threshold_scale: Literal["sigmoid", "raw"] = Field(
        "sigmoid", description="compare sigmoid(safety score) (Llama 2) or the raw score with the threshold"
    )
    whiten: bool = Field(True, description="whiten scores with each model's saved statistics")
    function: Literal["gold"] | None = Field(None, description="a programmatic reward instead of models")
    batch_size: int = Field(16, gt=0, description="(prompt, response) rows per scoring batch")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [self.model is not None, self.helpful is not None or self.safety is not None,
                 self.function is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of 'model', 'helpful' + 'safety', and 'function'")
        if (self.helpful is None) != (self.safety is None):
            raise ValueError("'helpful' and 'safety' go together")
        return self


class RejectionSamplingStage(StageBase):
    """K samples per prompt from the policy, scored by the reward; the best is kept as SFT data, and
    (best, worst) as preference pairs. Samples are stored as they are made: a killed run resumes."""

    kind: Literal["rejection_sampling"] = "rejection_sampling"
    model: ModelSpec = Field(..., description="the policy to sample from")
    prompts: DataSpec = Field(..., description="prompt records (any of our files, or builtin: world)")
    reward: RewardSpec = Field(..., description="how samples are scored")
    k: int = Field(8, gt=0, description="samples per prompt (Llama 2/3 use 10 to 30)")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=128),
        description="temperature, top-p, length, seed, system prompt, prompts per generate call",
    )
    backend: GenerationBackend = Field("hf", description="hf (default) or vllm (extra align[vllm])")
    pool_previous_rounds: bool = Field(
        False, description="Llama 2's fix for regressions: the best over this round's samples and the "
        "samples of the same stage in earlier rounds, all rescored with this round's reward",
    )
    write_pairs: bool = Field(True, description="also write (best, worst) preference pairs for DPO")
    min_pair_gap: float = Field(0.0, ge=0, description="write a pair only when best - worst exceeds this")
    report_gold: bool = Field(
        False, description="also report the built-in world's gold score of the best and of all samples"
    )
