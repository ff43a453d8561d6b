"""Ghost Attention (Llama 2 sec. 3.3, appendix A.3.5): multi-turn SFT data that keeps a first-turn
instruction alive."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from align.config.base import Artifact, Consumes, StageBase
from align.config.reward import RewardSpec
from align.config.sampling import GenerationBackend, SamplingParams
from align.config.specs import EVALUATORS_HELP, DataSpec, EvaluatorNames, ModelSpec, Strict, plugin_name


class ConstraintGroup(Strict):
    """One kind of constraint an instruction can combine (Llama 2 used hobbies, a language, a public
    figure to act as): its options and how a chosen option is written."""

    name: str = Field(..., description="e.g. hobby, language, persona")
    options: list[str] = Field(..., min_length=1, description="the values to choose from, e.g. [tennis, chess]")
    text: str = Field(..., description="the full form, with {option}: 'You enjoy {option}.'")
    short: str | None = Field(None, description="the short form used when shortening: 'Hobby: {option}'")

    @model_validator(mode="after")
    def _templates(self):
        for form in (self.text, self.short):
            if form is not None and "{option}" not in form:
                raise ValueError(f"'{form}' has no {{option}} placeholder")
        return self


class InstructionPool(Strict):
    """Where the instructions come from: the built-in world's checkable instructions (upper case, an end
    word, a word limit; the combinations the multi-turn evaluation holds out are never used), or your
    own constraint groups."""

    builtin: Annotated[str | None, plugin_name("instructions")] = Field(
        "world", description="a plug-in's instruction pool (world: the built-in world's instructions)"
    )
    groups: list[ConstraintGroup] = Field(default_factory=list, description="your own constraint groups "
                                          "(with builtin: null)")
    max_combined: int = Field(2, ge=1, description="an instruction combines 1 to this many groups, at random")
    shorten: float = Field(0.0, ge=0, le=1, description="chance of writing the kept instruction in its short "
                           "form (Llama 2: half of the time); only groups with a short form are shortened")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.builtin is None) == (not self.groups):
            raise ValueError("give either builtin: world or groups (and builtin: null)")
        return self


class GattStage(StageBase):
    """Ghost Attention data: for each dialogue an instruction is drawn, attached to every user turn while
    the model answers turn by turn, then kept in the first turn only; answers not trained on get
    ``weight: 0`` (no loss): with ``loss_on: last`` (Llama 2) every answer but the last, with ``passing`` those
    the reward scores below ``min_score``. Writes SFT records for the sft stage. Dialogues are stored as they
    are made: a killed run keeps finished dialogues."""

    kind: Literal["gatt"] = "gatt"
    produces: ClassVar = {Artifact.SFT_RECORDS: "gatt.jsonl"}

    model: Annotated[ModelSpec, Consumes(Artifact.POLICY)] = Field(..., description="the model that answers")
    dialogues: Annotated[DataSpec, Consumes(Artifact.SFT_RECORDS)] = Field(
        default_factory=lambda: DataSpec(builtin="world_dialogues", builtin_size=512),
        description="multi-turn chats whose user turns are used (their answers are replaced)",
    )
    instructions: InstructionPool = Field(default_factory=InstructionPool, description="what to instruct")
    placement: Literal["system", "first_user"] = Field(
        "system", description="where the instruction is kept: a system message, or before the first user turn"
    )
    min_turns: int = Field(2, ge=1, description="shortest dialogue written (user turns)")
    max_turns: int = Field(8, ge=1, description="longest dialogue written; each dialogue's length is drawn "
                           "uniformly between min_turns and the smaller of this and its user turns")
    loss_on: Literal["last", "all", "passing"] = Field(
        "last", description="last: only the last answer is trained on, earlier ones get weight 0 (Llama 2); "
        "all: every answer is trained on; passing: every answer the reward scores at least min_score (needs "
        "min_score)",
    )
    k: int = Field(1, gt=0, description="samples per turn; with reward, the best is kept (else the first)")
    reward: RewardSpec | None = Field(None, description="scores the k samples of a turn (null: k must be 1)")
    min_score: float | None = Field(
        None, description="keep a dialogue only if the reward scores its last answer at least this (with "
        "loss_on passing: if any answer does), judged on what the model saw; needs reward (null: keep all)",
    )
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=48, batch_size=64),
        description="decoding of each answer; batch_size counts dialogues per generation call",
    )
    backend: GenerationBackend = Field("hf", description="hf (default) or vllm (extra align[vllm])")
    evaluators: EvaluatorNames = Field(
        default_factory=list, description=EVALUATORS_HELP + "; each answer judged on the messages the model saw "
        "(world: gold_instruction_following and gold_task_accuracy)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_turns > self.max_turns:
            raise ValueError(f"min_turns ({self.min_turns}) > max_turns ({self.max_turns})")
        if self.k > 1 and self.reward is None:
            raise ValueError("k > 1 needs a reward to pick the best sample")
        if self.min_score is not None and self.reward is None:
            raise ValueError("min_score needs a reward to score the answers")
        if self.loss_on == "passing" and self.min_score is None:
            raise ValueError("loss_on: passing needs min_score (and a reward)")
        return self
