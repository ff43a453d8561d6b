"""Evaluation stage: generate on held-out prompts, judge, score, and measure KL to a reference."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from align.config.base import PROMPT_SOURCES, Artifact, Consumes, StageBase
from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import DataSpec, ModelSpec


class EvaluationStage(StageBase):
    """Generate one answer per held-out prompt with the policy and report the built-in world's gold
    metrics (gold_helpfulness, safety_violation_rate, over_refusal_rate, per-family accuracy), the
    reward models' mean scores, and kl_to_reference."""

    kind: Literal["evaluate"] = "evaluate"
    produces: ClassVar = {Artifact.SAMPLES: "answers.jsonl"}
    runs_in: ClassVar = "align.stages.evaluation"

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the policy to evaluate")
    prompts: Annotated[DataSpec, Consumes(*PROMPT_SOURCES)] = Field(
        default_factory=lambda: DataSpec(builtin="world_eval", builtin_size=600),
        description="held-out prompts (default: the built-in world's evaluation prompts)",
    )
    reference: Annotated[ModelSpec | None, Consumes(Artifact.POLICY)] = Field(None, description="policy to measure KL against (null: no KL)")
    reward_models: Annotated[dict[str, ModelSpec], Consumes(Artifact.REWARD_MODEL)] = Field(
        default_factory=dict, description="name -> reward model; reports the mean score as reward/<name>"
    )
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=64, batch_size=32),
        description="decoding settings (default greedy)",
    )
    backend: GenerationBackend = Field("hf", description="hf or vllm")
    gold: Literal["auto", "on", "off"] = Field(
        "auto", description="gold metrics of the built-in world: auto = when the prompts are world prompts"
    )
