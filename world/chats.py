"""Multi-turn chats of the built-in world (:mod:`world.generator`): chat-like SFT data and the long dialogues
Ghost Attention builds its data from. Generated deterministically from a seed."""

from __future__ import annotations

import random

from data_schemas import Message, SFTRecord
from world.generator import SOURCE, _sft_response, respond, sample_task, sft_records

# World chats shaped more like real chat data (``chat_records``): mostly the short chats of ``sft_records``,
# plus long dialogues without a standing instruction (real long chats rarely carry one) and short chats
# that state one to three instructions (in a system turn or the first user message).
LONG_DIALOGUE_RATE = 0.15
INSTRUCTION_RATE = 0.15
# Share of those combinations stated as a system turn instead (real system prompts combine constraints too)
SYSTEM_COMBINATION_SHARE = 0.5


def chat_records(n: int, seed: int = 0) -> list[SFTRecord]:
    """SFT chats of the world closer to real chat data than ``sft_records``: 70% its 1-2 turn chats (30% with
    a system instruction), 15% dialogues of 3-8 turns with no instruction (the usual mistakes included),
    15% 1-2 turn chats that state a combination of instructions training may use (the multi-turn
    evaluation's combinations are held out), half in a system turn and half at the start of the first user
    message, followed by the answers. A model
    trained on it handles long dialogues and follows instructions near them, but has never had to keep an
    instruction over many turns: the setting Ghost Attention is for."""
    from world.retention import combination_text, follow_all, split_combinations

    rng = random.Random(f"world-chat:{seed}")
    short = iter(sft_records(n, seed))
    combos = split_combinations("train")
    records = []
    for i in range(n):
        r = rng.random()
        if r < LONG_DIALOGUE_RATE:
            msgs = []
            for _ in range(rng.randint(3, 8)):
                task = sample_task(rng, "train")
                msgs += [Message(role="user", content=task.prompt),
                         Message(role="assistant", content=_sft_response(task, rng, None)[1])]
            records.append(SFTRecord(messages=msgs, source=SOURCE, meta={"index": i, "shape": "long"}))
        elif r < LONG_DIALOGUE_RATE + INSTRUCTION_RATE:
            combo = rng.choice(combos)
            in_system = rng.random() < SYSTEM_COMBINATION_SHARE
            msgs = [Message(role="system", content=combination_text(combo))] if in_system else []
            for t in range(2 if rng.random() < 0.15 else 1):
                task = sample_task(rng, "train", "helpfulness")
                said = f"{combination_text(combo)} {task.prompt}" if t == 0 and not in_system else task.prompt
                msgs += [Message(role="user", content=said),
                         Message(role="assistant", content=follow_all(combo, task))]
            records.append(SFTRecord(messages=msgs, source=SOURCE, meta={"index": i, "shape": "instruction"}))
        else:
            records.append(next(short).model_copy(update={"meta": {"index": i, "shape": "short"}}))
    return records


def dialogue_records(n: int, seed: int = 0, turns: tuple[int, int] = (12, 12)) -> list[SFTRecord]:
    """Multi-turn chats of training tasks (``turns`` user turns, uniformly; 12 by default, longer than the
    multi-turn evaluation's 8: the gatt stage draws each dialogue's length itself), gold answers, no
    instruction: the user turns Ghost Attention builds its dialogues from (it replaces the answers)."""
    rng = random.Random(f"world-dialogues:{seed}")
    records = []
    for i in range(n):
        msgs, families = [], []
        for _ in range(rng.randint(*turns)):
            task = sample_task(rng, "train")
            msgs += [Message(role="user", content=task.prompt),
                     Message(role="assistant", content=respond(task, "gold", rng))]
            families.append(task.family)
        records.append(SFTRecord(messages=msgs, source=SOURCE, meta={"index": i, "families": families}))
    return records
