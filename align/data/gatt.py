"""Ghost Attention data, the parts without a model (Llama 2 sec. 3.3):

1. :func:`plan_dialogues`: for each source chat, its user turns (the first ``n`` of them, ``n`` drawn between
   ``min_turns`` and ``max_turns``) and an instruction drawn from the pool;
2. the model answers turn by turn with :func:`attach` (the instruction before every user message);
3. :func:`gatt_record`: the instruction kept in the first turn only (a system message or before the first
   user message, possibly in its short form), the answers as sampled, ``weight: 0`` on the earlier answers
   when only the last is trained on (Llama 2 zeroes the loss on the previous turns: their answers were made
   with the instruction in sight, which the training dialogue no longer shows there).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from align import plugins
from align.config.gatt import InstructionPool
from data_schemas import Message, SFTRecord


@dataclass(frozen=True)
class DialoguePlan:
    users: list[str]  # the user turns, without the instruction
    instruction: str  # attached to every user turn while sampling
    kept: str  # what the training record keeps in its first turn (the instruction or its short form)
    names: list[str]  # what was combined, e.g. ["upper", "end_word:done"]


def builtin_instructions(name: str) -> list[tuple[str, list[str]]]:
    """(text, names) of every instruction of a plug-in's pool (:mod:`align.plugins`; ``world``: the built-in
    world's combinations that training may use, those the multi-turn evaluation holds out left out)."""
    return plugins.load("instructions", name)()


def draw_instruction(pool: InstructionPool, rng: random.Random,
                     builtin: list | None = None) -> tuple[str, str, list[str]]:
    """-> (full text, kept text, names) of one instruction (``builtin``: the pool's list, when read already)."""
    if pool.builtin is not None:
        choices = [(t, n) for t, n in (builtin if builtin is not None else builtin_instructions(pool.builtin))
                   if len(n) <= pool.max_combined]
        text, names = rng.choice(choices)
        return text, text, names  # a plug-in's judge reads the full form only: never shortened
    groups = rng.sample(pool.groups, rng.randint(1, min(pool.max_combined, len(pool.groups))))
    options = [rng.choice(g.options) for g in groups]
    full = " ".join(g.text.format(option=o) for g, o in zip(groups, options, strict=True))
    kept = full
    if rng.random() < pool.shorten:
        kept = " ".join((g.short or g.text).format(option=o) for g, o in zip(groups, options, strict=True))
    return full, kept, [f"{g.name}:{o}" for g, o in zip(groups, options, strict=True)]


def plan_dialogues(records: Sequence[SFTRecord], pool: InstructionPool, min_turns: int, max_turns: int,
                   seed: int) -> list[DialoguePlan]:
    """One plan per source chat with at least ``min_turns`` user turns (others are skipped)."""
    rng = random.Random(f"gatt:{seed}")
    builtin = builtin_instructions(pool.builtin) if pool.builtin is not None else None
    plans = []
    for record in records:
        users = [m.content for m in record.messages if m.role == "user"]
        if len(users) < min_turns:
            continue
        n = rng.randint(min_turns, min(max_turns, len(users)))
        full, kept, names = draw_instruction(pool, rng, builtin)
        plans.append(DialoguePlan(users=users[:n], instruction=full, kept=kept, names=names))
    return plans


def attach(instruction: str, user: str) -> str:
    """The user message the model sees while the data is made: the instruction, then the message."""
    return f"{instruction} {user}"


def as_seen(plan: DialoguePlan, answers: Sequence[str]) -> list[tuple[list[dict], str]]:
    """Each turn as the model answered it: (the messages it saw, the instruction before every user
    message; its answer)."""
    messages: list[dict] = []
    turns = []
    for user, answer in zip(plan.users, answers, strict=True):
        messages.append({"role": "user", "content": attach(plan.instruction, user)})
        turns.append((list(messages), answer))
        messages.append({"role": "assistant", "content": answer})
    return turns


def gatt_record(plan: DialoguePlan, answers: Sequence[str], placement: str, loss_on: str,
                source: str = "gatt", meta: dict | None = None,
                passing: Sequence[bool] | None = None) -> SFTRecord:
    """The training dialogue: the instruction in the first turn only; with ``loss_on='last'`` every answer
    but the last has weight 0; with ``'passing'``, every answer whose ``passing`` flag is false."""
    if len(answers) != len(plan.users):
        raise ValueError(f"{len(answers)} answers for {len(plan.users)} user turns")
    messages = [Message(role="system", content=plan.kept)] if placement == "system" else []
    last = len(answers) - 1
    for t, (user, answer) in enumerate(zip(plan.users, answers, strict=True)):
        content = attach(plan.kept, user) if placement == "first_user" and t == 0 else user
        if loss_on == "passing":
            if passing is None:
                raise ValueError("loss_on='passing' needs which answers pass")
            weight = None if passing[t] else 0
        else:
            weight = 0 if loss_on == "last" and t < last else None
        messages += [Message(role="user", content=content),
                     Message(role="assistant", content=answer, weight=weight)]
    return SFTRecord(messages=messages, source=source,
                     meta={"instruction": plan.instruction, "kept": plan.kept, "combined": plan.names,
                           "turns": len(answers), **(meta or {})})
