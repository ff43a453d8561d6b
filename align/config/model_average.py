"""Config of the model-averaging stage (pydantic, no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from align.config.base import MODELS, Artifact, Consumes, StageBase
from align.config.specs import Strict

# config.json keys that may differ between runs of one architecture (align.stages.model_average compares the rest)
BOOKKEEPING_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                              "_commit_hash", "_attn_implementation_autoset"})


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

    models: Annotated[list[CheckpointRef], Consumes(*MODELS)] = Field(..., min_length=2, description="the checkpoints to average; the "
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

    def outputs(self, upstream):
        """A policy or a reward model, whichever the first checkpoint is."""
        first = self.models[0]
        if first.from_stage is not None:
            kinds = [k for k in MODELS if k in upstream.get(first.from_stage, ())]
            kind = kinds[0] if kinds else Artifact.POLICY
        else:
            kind = checkpoint_kind(first.path)
        return {kind: "model"}


def checkpoint_kind(path: str) -> Artifact:
    """A reward model if the folder's config names a sequence-classification architecture."""
    config = Path(path) / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return Artifact.POLICY
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return Artifact.REWARD_MODEL
    return Artifact.POLICY
