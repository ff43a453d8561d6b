"""Multi-turn instruction retention (Llama 2 §3.3, Table 30): is a first-turn instruction still followed
at turn 2, 4, 6, 8? Pure: no torch, no align.

A *retention dialogue* is an instruction combination of the world (``world.tasks.INSTRUCTIONS``: upper
case, an end word, a word limit; one to three of distinct kinds, e.g. "Always answer in upper case.
Always end your answer with the word done.") stated once, at turn 1, followed by ``turns`` ordinary
helpfulness questions of the world. The instruction is the system turn (``placement="system"``) or is
prefixed to the first user message (``placement="first_user"``); later user turns are the bare questions.

Each turn is graded with the gold judge (:func:`world.judge.judge`) on the messages the model saw at that
turn: the judge reads the task from the last user turn and the instructions from *all* system and user
turns, so the turn-1 instruction is enforced at every later turn. Two grades per turn:

- instruction followed: ``judge(...).instruction_ok``;
- task correct: ``judge(...).kind == "correct"`` (not the score, which the judge halves when an
  instruction is broken).

Combinations are split by a stable hash (``combination_split``): about a quarter are held out for
evaluation, so a model trained to retain the ``train`` combinations (e.g. by Ghost Attention) is measured
on combinations it never saw, with questions from the held-out phrasings of :mod:`world.generator`.

The plug-in (:mod:`world.plugin`) registers this module as the ``retention`` suite ``world`` (the evaluation
stage's ``retention:`` check, :mod:`align.stages.retention`) and :func:`training_instructions` as the GAtt
instruction pool ``world``.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from world.generator import sample_task
from world.judge import judge
from world.tasks import (
    FAMILIES,
    HELPFULNESS_FAMILIES,
    INSTRUCTIONS,
    Instruction,
    Task,
    all_instructions,
    apply_instruction,
    follows,
)

PLACEMENTS = ("system", "first_user")
KIND_ORDER = tuple(INSTRUCTIONS)  # upper, end_word, max_words: the order of a combination's sentences
EVAL_SHARE = 4  # one combination in EVAL_SHARE (by hash) is held out
_SPLIT_SALT = "retention-1:"  # the first salt giving the split the properties of ``combination_split``


# ---------------------------------------------------------------- instruction combinations


def _sorted_combo(combo: Sequence[Instruction]) -> tuple[Instruction, ...]:
    return tuple(sorted(combo, key=lambda i: KIND_ORDER.index(i.kind)))


def combination_key(combo: Sequence[Instruction]) -> str:
    """A stable name of a combination: ``upper+end_word:done+max_words:3``."""
    return "+".join(f"{i.kind}:{i.arg}" if i.arg else i.kind for i in _sorted_combo(combo))


def combination_text(combo: Sequence[Instruction]) -> str:
    """The instructions' sentences joined by a space, in ``KIND_ORDER``."""
    return " ".join(i.text for i in _sorted_combo(combo))


def follow_all(combo: Sequence[Instruction], task: Task) -> str:
    """The gold answer of ``task`` following every instruction of ``combo``: the long answer, or the
    short one when the long one is over the word limit once the end word is added, then the end word,
    then upper case ("Kelm." -> "Kelm, done." -> "KELM, DONE.")."""
    by_kind = {i.kind: i for i in combo}
    text = ""
    for short in (False, True):
        text = task.answer(short=short)
        for kind in ("end_word", "upper"):
            if kind in by_kind:
                text = apply_instruction(by_kind[kind], task, text)
        if all(follows(i, text) for i in combo):
            break
    return text


def _representative_tasks() -> list[Task]:
    """One task of every helpfulness family and template (operands chosen for the longest answers)."""
    fields = {"add": {"a": "5", "b": "5"}, "sub": {"a": "5", "b": "0"}, "upper": {"w": "cat"},
              "first_letter": {"w": "owl"}, "capital": {"c": "Zorbia"}, "color": {"n": "wemble"}}
    return [Task(f, fields[f], t) for f in HELPFULNESS_FAMILIES for t in range(len(FAMILIES[f].prompts))]


def satisfiable(combo: Sequence[Instruction]) -> bool:
    """Whether a correct answer following every instruction of ``combo`` exists for every helpfulness
    task of the world (checked on :func:`follow_all`'s answer with the gold judge)."""
    text = combination_text(combo)
    for task in _representative_tasks():
        j = judge([{"role": "system", "content": text}, {"role": "user", "content": task.prompt}],
                  follow_all(combo, task))
        if j.kind != "correct" or not j.instruction_ok:
            return False
    return True


@cache
def _combinations() -> tuple[tuple[Instruction, ...], ...]:
    by_kind = {k: [i for i in all_instructions() if i.kind == k] for k in KIND_ORDER}
    combos = [combo for r in (1, 2, 3) for kinds in itertools.combinations(KIND_ORDER, r)
              for combo in itertools.product(*(by_kind[k] for k in kinds))]
    # Combinations no correct answer can follow are left out. With the world's instructions none is: every
    # helpfulness task has a one-word short answer ("Kelm.", "5."), so even "at most 3 words" plus an end
    # word fits ("Kelm, done." is 2 words) and upper case does not change the grade (the judge reads answers
    # case-blind except for the ``upper`` family, whose answer is upper case anyway). A limit of 1 word
    # with an end word would be unsatisfiable ("Kelm, done." is 2 words) and is dropped here if ever added.
    return tuple(c for c in combos if satisfiable(c))


def instruction_combinations() -> list[tuple[Instruction, ...]]:
    """Every satisfiable combination of 1-3 world instructions of distinct kinds, in a stable order (by
    size, then kinds in ``KIND_ORDER``, then ``all_instructions`` order); each sorted by ``KIND_ORDER``."""
    return list(_combinations())


def combination_split(combo: Sequence[Instruction]) -> str:
    """"eval" for about a quarter of the combinations (a stable CRC32 hash of ``combination_key``), else
    "train". The salt is fixed so that both splits contain every instruction kind and the eval split has
    singles and pairs (checked by the tests)."""
    h = zlib.crc32((_SPLIT_SALT + combination_key(combo)).encode())
    return "eval" if h % EVAL_SHARE == 0 else "train"


def split_combinations(split: str) -> list[tuple[Instruction, ...]]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [c for c in instruction_combinations() if combination_split(c) == split]


def training_instructions() -> list[tuple[str, list[str]]]:
    """(text, names) of every combination training may use: GAtt's ``instructions: {builtin: world}`` (the
    plug-in's instruction pool ``world``). The combinations the multi-turn evaluation holds out are left out."""
    return [(combination_text(combo), [f"{i.kind}:{i.arg}" if i.arg else i.kind for i in combo])
            for combo in split_combinations("train")]


# ---------------------------------------------------------------- dialogues


@dataclass(frozen=True)
class RetentionDialogue:
    """An instruction stated at turn 1 and the user turns (bare world questions) that follow."""

    instruction: str  # combination_text(combo)
    combo: tuple[Instruction, ...]
    user_turns: list[str]  # one world question per turn, without the instruction


def retention_dialogues(n: int, turns: int, seed: int = 0, split: str = "eval") -> list[RetentionDialogue]:
    """``n`` dialogues of ``turns`` user turns, deterministic from ``seed``.

    Combinations of ``split`` are dealt in shuffled rounds (each used about equally often); the questions
    are helpfulness tasks only (no harmful requests, no look-alikes) of the same split of
    :func:`world.generator.split_of` (held-out phrasings for "eval": none occurs in training data), distinct
    within a dialogue."""
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    combos = split_combinations(split)
    rng = random.Random(f"world-retention-{split}:{seed}")
    dialogues: list[RetentionDialogue] = []
    deck: list[tuple[Instruction, ...]] = []
    for _ in range(n):
        if not deck:
            deck = list(combos)
            rng.shuffle(deck)
        combo = deck.pop()
        questions: list[str] = []
        misses = 0
        while len(questions) < turns:
            prompt = sample_task(rng, split, "helpfulness").prompt
            if prompt in questions and misses < 200:  # distinct while the pool (100+ questions) allows
                misses += 1
                continue
            questions.append(prompt)
        dialogues.append(RetentionDialogue(combination_text(combo), combo, questions))
    return dialogues


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def opening_messages(dialogue: RetentionDialogue, placement: str) -> list[dict]:
    """The messages before the first user turn: the system instruction, or none."""
    _check_placement(placement)
    return [{"role": "system", "content": dialogue.instruction}] if placement == "system" else []


def user_message(dialogue: RetentionDialogue, placement: str, turn: int) -> str:
    """The user message the model sees at ``turn`` (1-based): the question, with the instruction in
    front at turn 1 when ``placement == "first_user"``."""
    _check_placement(placement)
    question = dialogue.user_turns[turn - 1]
    return f"{dialogue.instruction} {question}" if placement == "first_user" and turn == 1 else question


def first_turn_messages(dialogue: RetentionDialogue, placement: str) -> list[dict]:
    """The prompt of turn 1."""
    return turn_messages(dialogue, placement, [], 1)


def turn_messages(dialogue: RetentionDialogue, placement: str, responses: Sequence[str], turn: int) -> list[dict]:
    """The prompt the model sees at ``turn`` (1-based): opening, then each earlier user message and the
    model's response (``responses[:turn - 1]``), then the user message of ``turn``."""
    if not 1 <= turn <= len(dialogue.user_turns):
        raise ValueError(f"turn must be in 1..{len(dialogue.user_turns)}, got {turn}")
    if len(responses) < turn - 1:
        raise ValueError(f"turn {turn} needs {turn - 1} earlier responses, got {len(responses)}")
    messages = opening_messages(dialogue, placement)
    for t in range(1, turn):
        messages += [{"role": "user", "content": user_message(dialogue, placement, t)},
                     {"role": "assistant", "content": responses[t - 1]}]
    return messages + [{"role": "user", "content": user_message(dialogue, placement, turn)}]


def transcript(dialogue: RetentionDialogue, placement: str, responses: Sequence[str]) -> list[dict]:
    """The whole conversation as the model saw it: the prompt of the last answered turn plus its answer."""
    if not responses:
        return opening_messages(dialogue, placement)
    return turn_messages(dialogue, placement, responses, len(responses)) + [
        {"role": "assistant", "content": responses[-1]}]


# ---------------------------------------------------------------- grading


def grade_dialogue(dialogue: RetentionDialogue, responses: Sequence[str], placement: str) -> list[tuple[bool, bool]]:
    """Per answered turn: (every instruction followed, task correct), judged on that turn's prompt."""
    if len(responses) > len(dialogue.user_turns):
        raise ValueError(f"{len(responses)} responses for {len(dialogue.user_turns)} user turns")
    grades = []
    for t, response in enumerate(responses, start=1):
        j = judge(turn_messages(dialogue, placement, responses, t), response)
        grades.append((bool(j.instruction_ok), j.kind == "correct"))
    return grades


def retention_metrics(dialogues: Sequence[RetentionDialogue], responses: Sequence[Sequence[str]], placement: str,
                      report_turns: Sequence[int]) -> dict[str, float]:
    """``retention/instruction_turn_{t}`` and ``retention/task_turn_{t}`` for each ``t`` of
    ``report_turns`` (1-based; over the dialogues that reached turn t, left out when none did),
    ``retention/instruction_mean`` and ``retention/task_mean`` over all graded turns, ``retention/n``
    (dialogues)."""
    grades = [grade_dialogue(d, r, placement) for d, r in zip(dialogues, responses, strict=True)]
    metrics = {"retention/n": float(len(grades))}
    for t in report_turns:
        at = [g[t - 1] for g in grades if len(g) >= t]
        if at:
            metrics[f"retention/instruction_turn_{t}"] = sum(i for i, _ in at) / len(at)
            metrics[f"retention/task_turn_{t}"] = sum(c for _, c in at) / len(at)
    flat = [x for g in grades for x in g]
    if flat:
        metrics["retention/instruction_mean"] = sum(i for i, _ in flat) / len(flat)
        metrics["retention/task_mean"] = sum(c for _, c in flat) / len(flat)
    return metrics


def describe(dialogue: RetentionDialogue) -> dict:
    """What ``retention.jsonl`` records of a dialogue besides its messages and grades."""
    return {"instruction": dialogue.instruction,
            "combo": [f"{x.kind}:{x.arg}" if x.arg else x.kind for x in dialogue.combo]}


def rates_by_turn(grades: Sequence[Sequence[tuple[bool, bool]]]) -> tuple[list[float], list[float]]:
    """(instruction-following rate, task accuracy) at each turn 1..longest, over the dialogues reaching it."""
    longest = max((len(g) for g in grades), default=0)
    ins, task = [], []
    for t in range(longest):
        at = [g[t] for g in grades if len(g) > t]
        ins.append(sum(i for i, _ in at) / len(at))
        task.append(sum(c for _, c in at) / len(at))
    return ins, task
