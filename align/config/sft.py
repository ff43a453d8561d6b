"""The ``sft`` stage: supervised fine-tuning on multi-turn chats (pydantic only, no torch)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from align.config.base import Artifact, Consumes, StageBase
from align.config.specs import DataSpec, ModelSpec, TrainConfig


class SFTStage(StageBase):
    """Supervised fine-tuning on multi-turn chats; the loss is on assistant turns only."""

    kind: Literal["sft"] = "sft"
    produces: ClassVar = {Artifact.POLICY: "model"}
    runs_in: ClassVar = "align.train.sft"

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the policy to fine-tune")
    data: Annotated[DataSpec, Consumes(Artifact.SFT_RECORDS)] = Field(
        ..., description="SFT conversations (our schema or TRL 'messages')"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")
    packing: bool = Field(
        True,
        description="fill micro-batches by token budget (batch_size * max_length tokens) and pack "
        "short examples end to end into rows of max_length; attention never crosses examples",
    )
    system_prompt: str | None = Field(None, description="system prompt added to records that have none")
