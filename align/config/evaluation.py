"""Evaluation stage: generate on held-out prompts, judge, score, and measure KL to a reference."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from align.config.base import PROMPT_SOURCES, Artifact, Consumes, StageBase
from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import EVALUATORS_HELP, DataSpec, EvaluatorNames, ModelSpec, Strict


class RetentionEval(Strict):
    """Multi-turn instruction retention (Llama 2 §3.3, Table 30; the world plug-in's ``retention`` suite,
    :mod:`align.stages.retention`): an instruction of the built-in world stated at turn 1, then ``turns``
    world questions answered greedily; reports how often the instruction is still followed at each turn,
    and the attention on its tokens."""

    dialogues: int = Field(64, gt=0, description="number of dialogues")
    turns: int = Field(8, ge=2, description="user turns per dialogue")
    report_turns: list[int] = Field(
        default_factory=lambda: [2, 4, 6, 8],
        description="turns (1-based) reported as retention/instruction_turn_T, retention/task_turn_T "
        "and retention/attention_turn_T; each at most turns",
    )
    placement: Literal["system", "first_user"] = Field(
        "system", description="where the instruction is stated: the system turn, or in front of the "
        "first user message",
    )
    split: Literal["eval", "train"] = Field(
        "eval", description="instruction combinations and questions: eval = held out from training "
        "data (Ghost Attention synthesises from train)",
    )
    seed: int = Field(0, ge=0, description="seed of the dialogues (combinations and questions)")
    attention: bool = Field(
        True, description="also measure the attention mass on the instruction's tokens per turn (one "
        "forward pass per dialogue with eager attention; hf models)",
    )
    max_new_tokens: int = Field(32, gt=0, description="longest answer per turn, in tokens")

    @model_validator(mode="after")
    def _turns_in_range(self):
        bad = [t for t in self.report_turns if not 1 <= t <= self.turns]
        if bad:
            raise ValueError(f"report_turns {bad} are outside 1..turns ({self.turns})")
        return self


class EvaluationStage(StageBase):
    """Generate one answer per held-out prompt with the policy and report its evaluators' metrics (by
    default the built-in world's gold metrics: gold_helpfulness, safety_violation_rate, over_refusal_rate,
    per-family accuracy), the reward models' mean scores, and kl_to_reference; with ``retention``, also
    multi-turn instruction retention (retention/... metrics, retention.jsonl, retention.png)."""

    kind: Literal["evaluate"] = "evaluate"
    produces: ClassVar = {Artifact.SAMPLES: "answers.jsonl"}

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
    evaluators: EvaluatorNames = Field(
        default_factory=lambda: ["world"], description=EVALUATORS_HELP + " (world reports the gold metrics "
        "when the prompts are the world's, nothing on other prompts; [] for none)",
    )
    snapshots: bool = Field(
        False, description="also evaluate the policy's snapshots (its stage's train.snapshot_every) with the "
        "same prompts, decoding and reference: gold metrics and kl_to_reference per step in snapshots.jsonl "
        "(the last row is the final policy)",
    )
    retention: RetentionEval | None = Field(
        None, description="also run the multi-turn instruction-retention evaluation on the built-in "
        "world's dialogues (whatever the prompts are); writes retention.jsonl and retention.png",
    )
