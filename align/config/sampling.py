"""Sampling settings for generation backends (pydantic, no torch), so a recipe stage can hold them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from align.config.specs import Strict

GenerationBackend = Literal["hf", "vllm"]


class SamplingParams(Strict):
    """How each sample is drawn: temperature, nucleus (top-p), length, stop, seed, system prompt."""

    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0 = greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens "
                         "whose probability reaches top_p (1.0: off)")
    max_new_tokens: int = Field(256, gt=0, description="longest answer, in tokens")
    stop_at_eot: bool = Field(True, description="end a sample at the tokenizer's termination token "
                              "(<|eot_id|> for Llama 3 chats)")
    seed: int = Field(0, ge=0, description="seed of the sampling noise: the same seed, prompts and "
                      "batch_size give the same samples")
    system_prompt: str | None = Field(
        None, description="system turn added to chat prompts that have none (Llama 3 steers tone this way)"
    )
    batch_size: int = Field(8, gt=0, description="prompts per generation call; each is expanded to k samples "
                            "after one shared prefill, so a call decodes batch_size * k sequences")
