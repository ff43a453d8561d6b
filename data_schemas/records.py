"""Record models for every data file the toolkit reads or writes (pydantic v2 only).

Conversation rule (used by every model holding a list of messages): an optional leading
system message, then turns alternating user/assistant, starting with user.

Validators that look at a whole list raise ``PydanticCustomError`` whose ``ctx["at"]`` holds the
sub-path inside the field (e.g. ``"2.role"``); :mod:`data_schemas.io` appends it to the error
location so messages point at the exact turn.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

Role = Literal["system", "user", "assistant"]
Strength = Literal["significantly_better", "better", "slightly_better", "negligibly_better"]
STRENGTHS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")

__all__ = [
    "STRENGTHS",
    "Conversation",
    "Message",
    "PreferenceRecord",
    "PromptRecord",
    "Role",
    "SFTRecord",
    "ScoredSample",
    "Strength",
    "check_turns",
]


def _fail(reason: str, at: str | None = None) -> PydanticCustomError:
    ctx: dict[str, Any] = {"reason": reason}
    if at is not None:
        ctx["at"] = at
    return PydanticCustomError("schema", "{reason}", ctx)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Role
    content: str
    # Loss weight of an assistant message in SFT data (the convention of chat fine-tuning files): 0 = no
    # loss on it (context only), 1 = trained on. Absent = trained on, as in TRL's format.
    weight: int | None = None

    @field_validator("content")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise _fail("must be a non-empty string")
        return v

    @field_validator("weight", mode="before")
    @classmethod
    def _zero_or_one(cls, v: Any) -> Any:
        if v is not None and (type(v) is not int or v not in (0, 1)):
            raise _fail(f"must be 0 or 1, got {v!r}")
        return v

    @model_validator(mode="after")
    def _weight_on_assistant(self) -> Message:
        if self.weight is not None and self.role != "assistant":
            raise _fail(f"only assistant messages carry a weight (this one is '{self.role}')", "weight")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_weight(self, handler):
        data = handler(self)
        if data.get("weight") is None:
            data.pop("weight", None)
        return data

    @property
    def trained(self) -> bool:
        """Whether an assistant message is trained on (``weight`` absent or 1)."""
        return self.role == "assistant" and self.weight != 0


def check_turns(messages: list[Message], *, end: Literal["user", "assistant"] | None = None) -> None:
    """Enforce the conversation rule; ``end`` additionally fixes the role of the last turn.

    Raises ``PydanticCustomError`` (usable inside validators) with ``ctx["at"]`` set to the
    offending ``"<index>.role"`` where there is one.
    """
    if not messages:
        raise _fail("must contain at least one message")
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise _fail("must contain a user turn after the system message")
    for i, m in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role == "system":
            raise _fail("a system message is only allowed as the first message", f"{i}.role")
        if m.role != expected:
            raise _fail(
                f"expected {'an' if expected == 'assistant' else 'a'} '{expected}' turn, got '{m.role}' "
                "(turns must alternate user/assistant, starting with user)",
                f"{i}.role",
            )
    if end is not None and messages[-1].role != end:
        raise _fail(f"must end with a{'n' if end == 'assistant' else ''} {end} turn")


class Conversation(_Strict):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[Message]) -> list[Message]:
        check_turns(v)
        return v


class SFTRecord(_Strict):
    messages: list[Message]
    system: str | None = None
    source: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[Message]) -> list[Message]:
        check_turns(v, end="assistant")
        return v

    @field_validator("system")
    @classmethod
    def _system(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise _fail("must be a non-empty string (or null)")
        msgs = info.data.get("messages")
        if msgs and msgs[0].role == "system":
            raise _fail("cannot be set when messages already start with a system message")
        return v

    def conversation(self) -> list[Message]:
        """Messages with ``system`` prepended as a system message when it is set."""
        if self.system is None:
            return list(self.messages)
        return [Message(role="system", content=self.system), *self.messages]


class _HasPrompt(_Strict):
    prompt: list[Message]

    @field_validator("prompt")
    @classmethod
    def _prompt_turns(cls, v: list[Message]) -> list[Message]:
        check_turns(v, end="user")
        return v


class PreferenceRecord(_HasPrompt):
    """A prompt with responses ranked best-first (``responses[0]`` is preferred).

    ``edited=True`` means ``responses[0]`` is a human edit (Llama 3: edited > chosen > rejected).
    """

    responses: list[Message]
    strength: Strength | None = None
    edited: bool = False
    domain: str = "helpfulness"
    source: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("responses")
    @classmethod
    def _responses(cls, v: list[Message]) -> list[Message]:
        if len(v) < 2:
            raise _fail(f"must hold at least 2 responses (got {len(v)})")
        for i, m in enumerate(v):
            if m.role != "assistant":
                raise _fail(f"expected 'assistant', got '{m.role}'", f"{i}.role")
        return v

    @property
    def chosen(self) -> Message:
        return self.responses[0]

    @property
    def rejected(self) -> Message:
        return self.responses[-1]


class PromptRecord(_HasPrompt):
    tags: list[str] = Field(default_factory=list)
    source: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_safety(self) -> bool:
        return "safety" in self.tags


class ScoredSample(_HasPrompt):
    """A sampled response with its score (the reward that ranked it; null: not scored) and any others."""

    response: Message
    score: float | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("response")
    @classmethod
    def _assistant(cls, v: Message) -> Message:
        if v.role != "assistant":
            raise _fail(f"expected 'assistant', got '{v.role}'", "role")
        return v
