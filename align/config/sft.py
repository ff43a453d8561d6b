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

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the policy to fine-tune")
    data: Annotated[DataSpec, Consumes(Artifact.SFT_RECORDS)] = Field(
        ..., description="SFT conversations (our schema or TRL 'messages')"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")
    packing: bool = Field(
        True,
        description="lay examples end to end in rows of max_length tokens (attention never crosses "
        "examples); false: one right-padded row per example, batch_size examples per micro-batch",
    )
    packing_strategy: Literal["best_fit", "budget"] = Field(
        "best_fit",
        description="with packing: best_fit packs the whole epoch's examples best-fit into rows of max_length "
        "(TRL's bfd: rows nearly full), shuffles the rows and puts batch_size rows in a micro-batch; budget "
        "fills each micro-batch with consecutive examples of the shuffled order up to batch_size * max_length "
        "tokens and packs those first-fit into rows (more partly empty rows)",
    )
    system_prompt: str | None = Field(None, description="system prompt added to records that have none")
