"""One config class per stage kind. A new stage kind = a class here + its entry in ``STAGE_TYPES``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from align.config.specs import DataSpec, LaunchConfig, ModelSpec, Strict, TrainConfig, as_refs


class StageBase(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="unique name within a round")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="processes for this stage")
    in_rounds: list[int] | None = Field(
        None, description="run only in these rounds (1-based; default: every round). A reference to a "
        "stage that does not run in a round reads its latest earlier run",
    )

    def sources(self) -> list:
        """Every spec with a ``from_stage`` field (model and data specs), found at any depth."""
        found = []

        def walk(value):
            if isinstance(value, list):
                for item in value:
                    walk(item)
            elif isinstance(value, BaseModel):
                if "from_stage" in type(value).model_fields:
                    found.append(value)
                for name in type(value).model_fields:
                    walk(getattr(value, name))

        for name in type(self).model_fields:
            walk(getattr(self, name))
        return found

    def references(self) -> list[str]:
        """Names of the stages this one reads from ('NAME' or 'prev.NAME')."""
        return [ref for spec in self.sources() for ref in as_refs(spec.from_stage)]


class SFTStage(StageBase):
    """Supervised fine-tuning on multi-turn chats; the loss is on assistant turns only."""

    kind: Literal["sft"] = "sft"
    model: ModelSpec = Field(..., description="the policy to fine-tune")
    data: DataSpec = Field(..., description="SFT conversations (our schema or TRL 'messages')")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")
    packing: bool = Field(
        True,
        description="fill micro-batches by token budget (batch_size * max_length tokens) and pack "
        "short examples end to end into rows of max_length; attention never crosses examples",
    )
    system_prompt: str | None = Field(None, description="system prompt added to records that have none")

    @model_validator(mode="after")
    def _tokenizer_for_builtin(self):
        if self.model.path == "builtin:tiny" and self.model.tokenizer not in (None, "builtin:bytes"):
            raise ValueError("model.path builtin:tiny goes with the built-in tokenizer (builtin:bytes)")
        return self


from align.config.dpo import DPOStage  # noqa: E402 (subclasses StageBase above)
from align.config.evaluation import EvaluationStage  # noqa: E402
from align.config.model_average import ModelAverageStage  # noqa: E402
from align.config.rejection_sampling import RejectionSamplingStage  # noqa: E402
from align.config.reward_model import RewardModelStage  # noqa: E402

STAGE_TYPES = (SFTStage, DPOStage, RewardModelStage, ModelAverageStage, RejectionSamplingStage,
               EvaluationStage)
