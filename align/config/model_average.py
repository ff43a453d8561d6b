"""Config of the model-averaging stage (pydantic, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from align.config.specs import Strict
from align.config.stages import StageBase


class CheckpointRef(Strict):
    """A saved HF checkpoint: a local folder, or the model output of an earlier stage."""

    path: str | None = Field(None, description="local checkpoint folder (safetensors weights)")
    from_stage: str | None = Field(None, alias="from", description="an earlier stage whose model output to use")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.from_stage is None):
            raise ValueError("give exactly one of 'path' and 'from'")
        return self


class ModelAverageStage(StageBase):
    """Average the weights of models of one architecture (Llama 3 averages runs of its RM, SFT and DPO
    stages trained with different data or hyperparameters). Works for causal LMs and reward models."""

    kind: Literal["model_average"] = "model_average"
    models: list[CheckpointRef] = Field(..., min_length=2, description="the checkpoints to average; the "
                                        "first one's config, tokenizer and dtypes are kept")
    weights: list[float] | None = Field(
        None, description="one weight per model, normalised to sum to 1 (default: equal weights)"
    )

    @model_validator(mode="after")
    def _weights_match_models(self):
        if self.weights is None:
            return self
        if len(self.weights) != len(self.models):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.models)} models")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        return self

    def normalised_weights(self) -> list[float]:
        raw = self.weights or [1.0] * len(self.models)
        return [w / sum(raw) for w in raw]
