"""Built-in data sets, generated deterministically from a seed (nothing is downloaded).

``chat``: short single- and two-turn chats a model of a few million parameters can learn on a CPU in
a minute: small arithmetic, word reversal, upper-casing, letter counting, and a follow-up turn.

``world``, ``world_chat`` (more like real chat data: some long dialogues, instruction combinations in a
system or user turn) and ``world_dialogues`` (12 turns, the user turns of Ghost Attention) (SFT), ``world_helpful``
/ ``world_safety`` / ``world`` (preference) and ``world`` / ``world_eval`` (prompts): the built-in world
with gold judges, see :mod:`eval.world`.
"""

from __future__ import annotations

import random
from functools import partial

from data_schemas import Message, PreferenceRecord, SFTRecord
from eval.world import eval_prompt_records, preference_records, prompt_records, sft_records
from eval.world_chats import chat_records as world_chat_records
from eval.world_chats import dialogue_records

_WORDS = (
    "apple river stone cloud tiger lemon piano rocket garden silver window candle forest button "
    "planet mirror ocean pepper castle winter summer yellow dragon marble pillow basket camera"
).split()


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.randrange(20), rng.randrange(10)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    word = rng.choice(_WORDS)
    if kind == 2:
        return f"Reverse the word {word}.", f"The word {word} reversed is {word[::-1]}."
    if kind == 3:
        return f"Write {word} in capital letters.", f"{word.upper()}"
    letter = rng.choice(word)
    n = word.count(letter)
    return (
        f"How many times does the letter {letter} appear in {word}?",
        f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}.",
    )


def chat_records(n: int, seed: int = 0) -> list[SFTRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        q, a = _task(rng)
        messages = [Message(role="user", content=q), Message(role="assistant", content=a)]
        if rng.random() < 0.3:
            q2, a2 = _task(rng)
            messages += [Message(role="user", content="Thanks. " + q2), Message(role="assistant", content=a2)]
        records.append(SFTRecord(messages=messages, source="builtin:chat", meta={"index": i}))
    return records


def world_preference_records(n: int, seed: int = 0):
    """Both domains: helpfulness records first, then safety (half each)."""
    return preference_records(n - n // 2, seed, "helpfulness") + preference_records(n // 2, seed, "safety")


def chat_preference_records(n: int, seed: int = 0) -> list[PreferenceRecord]:
    """``builtin: chat`` preferences: a built-in chat task with 3 ranked answers: the right one, an
    abstention, and the (wrong) answer to another task."""
    chats = chat_records(n + 1, seed)
    out = []
    for i in range(n):
        user, right = chats[i].messages[0], chats[i].messages[1].content
        wrong = chats[i + 1].messages[1].content
        if wrong == right:
            wrong = wrong + " Or maybe not."
        answers = [right, "I am not sure.", wrong]
        out.append(PreferenceRecord(
            prompt=[user], responses=[Message(role="assistant", content=a) for a in answers],
            source="builtin:chat", meta={"index": i},
        ))
    return out


BUILTIN_SFT = {"chat": chat_records, "world": sft_records, "world_chat": world_chat_records,
               "world_dialogues": dialogue_records}
BUILTIN_PREFERENCE = {  # name -> fn(n, seed) -> list[PreferenceRecord]
    "chat": chat_preference_records,
    "world": world_preference_records,
    "world_helpful": partial(preference_records, domain="helpfulness"),
    "world_safety": partial(preference_records, domain="safety"),
}
BUILTIN_PROMPTS = {"world": prompt_records, "world_eval": eval_prompt_records}  # -> list[PromptRecord]
