"""The generation interface every backend implements, and the prompt handling they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

from align.config.sampling import SamplingParams
from align.data.chat import tokenize_prompt

# A prompt is either token ids (already rendered, ending with the assistant header) or a conversation:
# a sequence of messages ({"role", "content"} dicts or data_schemas.Message) that ends with a user turn.
Prompt = Union[Sequence[int], Sequence[Any]]  # noqa: UP007 (a type alias, read by people)


@dataclass(frozen=True)
class Sample:
    """One sampled answer."""

    token_ids: list[int]  # generated ids; ends with the stop token when finish_reason == "stop"
    text: str  # the decoded answer, without the stop token and special tokens
    finish_reason: Literal["stop", "length"]  # stop token reached, or max_new_tokens reached
    logps_sum: float | None  # sum of log p(token) under the distribution it was drawn from (temperature
    # and top-p applied; 0.0 for greedy); None where the backend does not report it
    prompt_ids: tuple[int, ...] = ()  # the prompt's ids as the backend rendered them (chat template, system turn)


class Generator(Protocol):
    """K samples per prompt. Backends: ``align.generation.make_generator("hf" | "vllm", ...)``."""

    def sample(self, prompts: Sequence[Prompt], k: int, params: SamplingParams) -> list[list[Sample]]:
        """``k`` samples for each prompt: ``result[i][j]`` is sample j of ``prompts[i]``."""
        ...

    def close(self) -> None:
        """Release what the backend holds (a vLLM engine's GPU memory); the generator is unusable after."""
        ...


def prompt_ids(tokenizer, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt. Conversations are rendered with the chat template (ending with the
    assistant header), with ``system_prompt`` as their first turn when they have no system turn."""
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    if isinstance(prompt[0], int):
        if system_prompt is not None:
            raise ValueError("system_prompt applies to conversation prompts, not to token ids")
        return list(prompt)
    messages = [_as_dict(m) for m in prompt]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenize_prompt(tokenizer, messages)


def _as_dict(message) -> dict:
    if isinstance(message, Mapping):
        return {"role": message["role"], "content": message["content"]}
    return {"role": message.role, "content": message.content}


def check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
