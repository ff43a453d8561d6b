"""The stage contract on the config side: typed artifacts, and the base class of every stage kind.

A stage kind is one pydantic class (a subclass of :class:`StageBase` with ``kind: Literal["..."]``) in a
module of ``align.config``, listed in :mod:`align.config.registry`. The class says

- what it **consumes**: every field holding a spec with a ``from`` reference (``ModelSpec``, ``DataSpec``,
  ...) is annotated ``Annotated[Spec, Consumes(Artifact.X, ...)]`` with the artifact types it accepts,
  in order of preference;
- what it **produces**: ``produces`` maps each artifact type to its path inside the stage's folder
  (``outputs()`` may refine it from the instance, e.g. no pairs file when pairs are off).

Which module **runs** a kind (its ``run(stage, ctx) -> StageResult``) is not config:
:func:`align.runner.stage_module` maps each kind to its module with plain imports.

``align validate`` checks every ``from:`` against what the referenced stage produces before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from align.config.specs import LaunchConfig, Strict, as_refs


class Artifact(str, Enum):
    """What a stage writes and another stage reads."""

    POLICY = "policy"  # an HF causal-LM checkpoint folder (save_pretrained)
    REWARD_MODEL = "reward_model"  # an HF sequence-classification checkpoint (num_labels=1) + reward_stats.json
    SFT_RECORDS = "sft_records"  # JSONL of data_schemas.SFTRecord
    PREFERENCES = "preferences"  # JSONL of data_schemas.PreferenceRecord (ranked responses)
    PROMPTS = "prompts"  # JSONL of data_schemas.PromptRecord
    SAMPLES = "samples"  # JSONL of data_schemas.ScoredSample

    def __str__(self) -> str:
        return self.value


MODELS = (Artifact.POLICY, Artifact.REWARD_MODEL)
# What a prompt reader accepts: prompt records, or the prompts of SFT / preference records.
PROMPT_SOURCES = (Artifact.PROMPTS, Artifact.SFT_RECORDS, Artifact.PREFERENCES)


@dataclass(frozen=True)
class Consumes:
    """Field metadata: the artifact types a reference in this field accepts, preferred first."""

    kinds: tuple[Artifact, ...]

    def __init__(self, *kinds: Artifact):
        object.__setattr__(self, "kinds", tuple(kinds))


@dataclass(frozen=True)
class Input:
    """One reference-carrying spec of a stage: where it sits in the recipe, and what it accepts."""

    where: str  # e.g. "reward.helpful", "models[1]"
    spec: Any  # a spec with a ``from_stage`` field (and usually ``path`` / ``paths`` / ``builtin``)
    accepts: tuple[Artifact, ...]


class StageBase(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="unique name within a round")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="processes for this stage")
    in_rounds: list[int] | None = Field(
        None, description="run only in these rounds (1-based; default: every round). A reference to a "
        "stage that does not run in a round reads its latest earlier run",
    )

    produces: ClassVar[Mapping[Artifact, str]] = {}

    def outputs(self, upstream: Mapping[str, frozenset[Artifact]]) -> dict[Artifact, str]:
        """Artifact type -> path inside the stage folder. ``upstream``: what each referenced stage
        produces (for kinds whose outputs depend on their inputs)."""
        return dict(self.produces)

    def inputs(self) -> list[Input]:
        """Every spec with a ``from_stage`` field, at any depth, with the artifact types it accepts."""
        return list(_walk(self, "", ()))

    def sources(self) -> list:
        return [i.spec for i in self.inputs()]

    def references(self) -> list[str]:
        """Names of the stages this one reads from ('NAME' or 'prev.NAME')."""
        return [ref for i in self.inputs() for ref in as_refs(i.spec.from_stage)]


def _walk(value: Any, where: str, accepts: tuple[Artifact, ...]) -> Iterator[Input]:
    if isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            yield from _walk(item, f"{where}[{k}]", accepts)
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _walk(item, f"{where}.{k}", accepts)
    elif isinstance(value, BaseModel):
        if "from_stage" in type(value).model_fields:
            yield Input(where, value, accepts)
        for name, info in type(value).model_fields.items():
            declared = next((m.kinds for m in info.metadata if isinstance(m, Consumes)), accepts)
            yield from _walk(getattr(value, name), f"{where}.{info.alias or name}".lstrip("."), declared)
