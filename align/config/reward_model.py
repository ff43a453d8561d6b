"""The ``reward_model`` stage: a scalar-head reward model on ranked preferences (pydantic only, no torch)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from align.config.base import MODELS, Artifact, Consumes, StageBase
from align.config.specs import DataSpec, ModelSpec, OptimConfig, StageRef, TrainConfig
from data_schemas import STRENGTHS, Strength
from rewards.encoding import MIN_MAX_LENGTH


def _rm_train() -> TrainConfig:
    return TrainConfig(epochs=1.0, optim=OptimConfig(lr=1e-5))  # Llama 2: one epoch (more overfits)


class RewardModelStage(StageBase):
    """Reward model (Llama 2 / 3): a causal LM backbone with a scalar head, trained on responses ranked
    best-first (2 or more per prompt, all in one packed row) with the pairwise ranking loss; saved as an
    HF sequence-classification checkpoint (num_labels=1) with reward_stats.json for whitening."""

    kind: Literal["reward_model"] = "reward_model"
    produces: ClassVar = {Artifact.REWARD_MODEL: "model"}

    model: Annotated[ModelSpec, Consumes(*MODELS)] = Field(
        ..., description="backbone: any causal LM (path, hub id, builtin:tiny, or from: an earlier stage) or a "
        "reward model to keep training; a new scalar head is added to a causal LM"
    )
    data: Annotated[DataSpec, Consumes(Artifact.PREFERENCES)] = Field(
        ..., description="preference records, best response first (our schema, TRL's chosen/rejected, or "
        "ranked 'responses'); eval_fraction holds out that share of the prompts (with all their records) for "
        "the accuracy metrics"
    )
    train: TrainConfig = Field(
        default_factory=_rm_train,
        description="training loop settings; batch_size counts prompts (one packed row each) and max_length "
        "bounds each prompt + response",
    )
    max_prompt_length: int | None = Field(
        None, gt=0, description="prompts keep their last this many tokens (default: half of train.max_length)"
    )
    margin: Literal["none", "llama2_small", "llama2_large", "column"] | dict[str, float] = Field(
        "none",
        description="margin in -log sigmoid(r_i - r_j - m): none (Llama 3), llama2_small (1, 2/3, 1/3, 0), "
        "llama2_large (3, 2, 1, 0), column (each record's own 'margin', TRL's column), or a mapping "
        "strength -> margin. Applies to the pairs whose worse response is the record's last one",
    )
    centering_coef: float = Field(
        0.0, ge=0, description="adds coef * (r_i + r_j)^2 per pair (TRL's center_rewards_coefficient); 0: off"
    )
    domain: str | None = Field(
        None, description="keep only records of this domain (e.g. helpfulness, safety); null: all records"
    )
    default_domain: str | None = Field(
        None, description="domain of records whose row sets none (e.g. safety for a file of safety pairs)"
    )
    min_strength: Strength | None = Field(
        None, description="drop training records labelled weaker than this (records with no label are kept)"
    )
    dedup_threshold: float | None = Field(
        None, gt=0, le=1,
        description="drop a response whose word-level similarity (difflib ratio) to a better-ranked response "
        "of the same record is at least this (training split only); null: off",
    )
    compare_with: Annotated[StageRef | None, Consumes(Artifact.REWARD_MODEL)] = Field(
        None, description="another reward model stage (e.g. prev.rm_helpful: last round's) that scores the same "
        "held-out records after training: compare_rm_accuracy beside rm_accuracy, and on the records annotated in "
        "this round (meta.round, as rejection sampling writes it) compare_rm_newest_accuracy beside "
        "rm_newest_accuracy (Llama 2's out-of-distribution drop of an RM on a newer policy's answers); skipped "
        "where the stage has not run",
    )
    stats_records: int = Field(
        1000, ge=0, description="training records scored (with all held-out ones) for reward_stats.json"
    )

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.margin, dict):
            unknown = sorted(set(self.margin) - set(STRENGTHS))
            if unknown:
                raise ValueError(f"margin: unknown strength(s) {unknown}; known: {', '.join(STRENGTHS)}")
        if self.train.snapshot_every:
            raise ValueError("train.snapshot_every writes policy snapshots; a reward model has none (use "
                             "save_every for checkpoints)")
        if self.train.max_length < MIN_MAX_LENGTH:
            raise ValueError(f"train.max_length must be at least {MIN_MAX_LENGTH} for a reward model (a prompt "
                             "token and a response token; a useful length holds the prompt and the responses)")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.train.max_length:
            raise ValueError("max_prompt_length must be smaller than train.max_length")
        return self
