"""How a stage is rewarded: one reward model, the Llama 2 Helpfulness + Safety combination, or a programmatic
reward function. ``align.models.reward_fn.build_reward`` turns it into a ``rewards.protocol.RewardFunction``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from align.config.base import Artifact, Consumes
from align.config.specs import ModelSpec, Strict, plugin_name


class RewardSpec(Strict):
    """What scores the samples: one reward model, the Llama 2 Helpfulness + Safety combination, or a
    programmatic reward function (``gold``: the built-in world's judge, for controlled experiments; any
    plug-in's reward function by name, or yours by dotted path: :mod:`align.plugins`)."""

    model: Annotated[ModelSpec | None, Consumes(Artifact.REWARD_MODEL)] = Field(None, description="one reward model (a reward_model stage or a path)")
    helpful: Annotated[ModelSpec | None, Consumes(Artifact.REWARD_MODEL)] = Field(None, description="the Helpfulness reward model (with 'safety')")
    safety: Annotated[ModelSpec | None, Consumes(Artifact.REWARD_MODEL)] = Field(None, description="the Safety reward model (with 'helpful')")
    safety_threshold: float = Field(0.15, description="Llama 2: use the safety score when it is below this")
    threshold_scale: Literal["whitened", "sigmoid", "raw"] = Field(
        "whitened", description="what the threshold is compared with: whitened = sigmoid of the safety score "
        "whitened with the safety model's stats (a Bradley-Terry model's raw scores have an arbitrary offset, "
        "which the raw sigmoid would take for unsafety); sigmoid = sigmoid(raw score), Llama 2's rule for a "
        "calibrated model; raw = the raw score"
    )
    whiten: bool = Field(True, description="whiten scores with each model's saved statistics")
    function: Annotated[str | None, plugin_name("reward")] = Field(
        None, description="a programmatic reward instead of models: a plug-in's by name (gold: the built-in "
        "world's judge) or a dotted path 'package.module:name' to a rewards.protocol.RewardFunction",
    )
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
