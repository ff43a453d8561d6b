"""The one list of stage kinds: every stage config class, written out, in the order a round runs them.

Adding a stage kind = importing its class here and listing it in ``STAGE_TYPES``, and naming the module
that runs it in :func:`align.runner.stage_module`. Two classes with one ``kind`` are an error at import."""

from __future__ import annotations

from collections.abc import Iterable

from align.config.base import StageBase
from align.config.dpo import DPOStage
from align.config.evaluation import EvaluationStage
from align.config.gatt import GattStage
from align.config.model_average import ModelAverageStage
from align.config.ppo import PPOStage
from align.config.rejection_sampling import RejectionSamplingStage
from align.config.reward_model import RewardModelStage
from align.config.sft import SFTStage

STAGE_TYPES: tuple[type[StageBase], ...] = (
    SFTStage,
    RewardModelStage,
    RejectionSamplingStage,
    DPOStage,
    PPOStage,
    GattStage,
    ModelAverageStage,
    EvaluationStage,
)


def kind_of(cls: type[StageBase]) -> str:
    """The ``kind`` a stage class is written with in a recipe (its ``Literal`` default)."""
    return cls.model_fields["kind"].default


def by_kind(types: Iterable[type[StageBase]]) -> dict[str, type[StageBase]]:
    """Kind -> class; a kind defined twice is an error."""
    found: dict[str, type[StageBase]] = {}
    for cls in types:
        kind = kind_of(cls)
        if kind in found:
            raise TypeError(f"stage kind '{kind}' is defined twice: {found[kind].__name__} and {cls.__name__}")
        found[kind] = cls
    return found


STAGE_BY_KIND: dict[str, type[StageBase]] = by_kind(STAGE_TYPES)
