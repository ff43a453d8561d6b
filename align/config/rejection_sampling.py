"""Rejection sampling: K samples per prompt from the current policy, the best (by reward) kept as SFT data."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from align.config.base import PROMPT_SOURCES, Artifact, Consumes, StageBase
from align.config.reward import RewardSpec
from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import EVALUATORS_HELP, DataSpec, EvaluatorNames, ModelSpec


class RejectionSamplingStage(StageBase):
    """K samples per prompt from the policy, scored by the reward; the best is kept as SFT data, and
    (best, worst) as preference pairs. Samples are stored as they are made: a killed run resumes."""

    kind: Literal["rejection_sampling"] = "rejection_sampling"
    produces: ClassVar = {Artifact.SFT_RECORDS: "sft.jsonl", Artifact.PREFERENCES: "pairs.jsonl",
                          Artifact.SAMPLES: "samples.jsonl"}

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the policy to sample from")
    prompts: Annotated[DataSpec, Consumes(*PROMPT_SOURCES)] = Field(..., description="prompt records (any of our files, or builtin: world)")
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
    drop_unfinished: bool = Field(
        False, description="leave out samples that stopped at sampling.max_new_tokens (no termination token): "
        "they end mid-answer, and as SFT data they teach the model to stop there (counted as unfinished_dropped; "
        "a prompt with no finished sample is skipped)",
    )
    write_pairs: bool = Field(True, description="also write (best, worst) preference pairs for DPO")
    min_pair_gap: float = Field(0.0, ge=0, description="write a pair only when best - worst exceeds this")
    compare_reward: RewardSpec | None = Field(
        None, description="a second reward that scores the same candidates, only to be compared (e.g. last round's "
        "reward models: from: [prev.rm_helpful, rm_helpful]): with an evaluator that scores answers, "
        "<name>_compare_reward_accuracy beside <name>_reward_accuracy",
    )
    best_of: list[int] = Field(
        default_factory=list, description="also report best-of-N for each N here (each <= k): the reward's pick "
        "among each prompt's first N samples, judged by the evaluators (best_of_<N>/<metric>), with its analytic "
        "KL to the policy, log N - (N-1)/N (best_of_<N>/kl): the sampling baseline of a reward-KL plot",
    )
    evaluators: EvaluatorNames = Field(
        default_factory=list, description=EVALUATORS_HELP + "; with a per-answer score (world: the gold score) "
        "reported as <name>_best_mean, <name>_sample_mean and <name>_first_mean (kept, all, first samples), and "
        "<name>_reward_accuracy: over each prompt's candidate pairs that this score separates by more than "
        "min_pair_gap, the share the reward orders the same way (by prompt tag: /helpfulness, /safety)",
    )

    @field_validator("best_of")
    @classmethod
    def _positive(cls, ns: list[int]) -> list[int]:
        if any(n < 1 for n in ns):
            raise ValueError("every N must be at least 1")
        return ns

    @model_validator(mode="after")
    def _best_of_within_k(self):
        if any(n > self.k for n in self.best_of):
            raise ValueError(f"best_of: every N must be at most k={self.k} (the samples drawn per prompt)")
        return self

    def outputs(self, upstream):
        out = dict(self.produces)
        if not self.write_pairs:
            del out[Artifact.PREFERENCES]
        return out
