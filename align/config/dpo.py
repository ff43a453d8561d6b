"""The ``dpo`` stage: Direct Preference Optimisation, Llama 3 style (pydantic only, no torch)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from align.config.base import Artifact, Consumes, StageBase
from align.config.specs import DataSpec, ModelSpec, OptimConfig, TrainConfig


def _dpo_train() -> TrainConfig:
    return TrainConfig(optim=OptimConfig(lr=1e-5))  # Llama 3: lr 1e-5


class DPOStage(StageBase):
    """DPO on preference pairs: formatting tokens masked out of the log-prob sums, an NLL term on the
    chosen response, reference log-probs computed once and cached, prompt shared by the responses."""

    kind: Literal["dpo"] = "dpo"
    produces: ClassVar = {Artifact.POLICY: "model"}

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the policy to train (a path, builtin:tiny, or from: an earlier stage)")
    reference: Annotated[ModelSpec | None, Consumes(Artifact.POLICY)] = Field(
        None,
        description="the reference model (must share the policy's tokenizer); default: the policy's starting "
        "point (with LoRA: the base model with the adapter disabled, no second copy)",
    )
    data: Annotated[DataSpec, Consumes(Artifact.PREFERENCES)] = Field(
        ...,
        description="preference records: JSONL files (ours or TRL's chosen/rejected), builtin 'chat', or "
        "from: an earlier stage's 'pairs' output",
    )
    train: TrainConfig = Field(
        default_factory=_dpo_train,
        description="training loop settings; batch_size counts preference records (one row each)",
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature (Llama 3: 0.1)")
    nll_weight: float = Field(
        0.2, ge=0, description="weight of the NLL on the chosen response, termination token included (Llama 3: 0.2)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise")
    formatting_tokens: Literal["auto", "off"] | list[str] = Field(
        "auto",
        description="tokens left out of the DPO log-prob sums, where the chat template put them: auto (the "
        "header/termination tokens of the template), a list of token strings, or off",
    )
    pairs: Literal["best_worst", "adjacent"] = Field(
        "best_worst",
        description="records with more than 2 ranked responses: one pair (first, last) or every adjacent pair",
    )
    metrics_records: int = Field(
        1024, ge=0, description="training records re-scored at the start and end for reward accuracy and margin"
    )
