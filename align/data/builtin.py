"""Built-in data sets, generated deterministically from a seed (nothing is downloaded).

``chat``: short single- and two-turn chats a model of a few million parameters can learn on a CPU in
a minute: small arithmetic, word reversal, upper-casing, letter counting, and a follow-up turn.

Plug-ins add theirs by name (:mod:`align.plugins`): the built-in world's ``world``, ``world_chat``,
``world_dialogues`` (SFT), ``world``, ``world_helpful``, ``world_safety`` (preference) and ``world``,
``world_eval`` (prompts), see :mod:`world.plugin`. The tables below hold both, align's first.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping

from align import plugins
from data_schemas import Message, PreferenceRecord, SFTRecord

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


class BuiltinSets(Mapping):
    """name -> fn(n, seed) -> records: align's own sets, then the plug-ins' of ``kind`` (imported when used)."""

    def __init__(self, kind: str, own: dict[str, Callable]):
        self.kind, self.own = kind, own

    def __getitem__(self, name: str) -> Callable:
        if name in self.own:
            return self.own[name]
        if name in plugins.names(self.kind):
            return plugins.load(self.kind, name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.own) + [n for n in plugins.names(self.kind) if n not in self.own])

    def __len__(self) -> int:
        return len(list(iter(self)))


BUILTIN_SFT = BuiltinSets("sft", {"chat": chat_records})  # -> list[SFTRecord]
BUILTIN_PREFERENCE = BuiltinSets("preferences", {"chat": chat_preference_records})  # -> list[PreferenceRecord]
BUILTIN_PROMPTS = BuiltinSets("prompts", {})  # -> list[PromptRecord]
