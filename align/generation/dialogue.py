"""Multi-turn roll-outs: the model answers a scripted user, turn by turn, all dialogues batched.

    replies = roll_out(generator, [[system_msg], []], [["Q1", "Q2"], ["Q1"]], params)
    replies[i][t]  # the model's answer to user turn t (0-based) of dialogue i

At turn t every dialogue that still has a user turn gets one prompt: its messages so far (the starting
messages, then each earlier user message and the chosen answer) plus its user message of turn t, so one
``generator.sample`` call serves all dialogues at that turn. ``decorate_user(i, t, text)`` may rewrite the
user message the model sees (e.g. attach an instruction to every user turn, as Ghost Attention's data
synthesis does; or to the first one only); the rewritten text is what the later turns see too. Only the
answers are returned: the caller knows what it asked (the messages are its starting messages and its
decorated user turns, interleaved with the answers).

With ``k > 1`` each prompt gets k samples and ``choose(prompts, candidates) -> list[int]`` picks one per
prompt (e.g. the best by a reward model: rejection sampling per turn); by default the first sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from align.config.sampling import SamplingParams
from align.generation.protocol import Generator, _as_dict

Decorate = Callable[[int, int, str], str]  # (dialogue index, turn index (0-based), user text) -> text seen
Choose = Callable[[list[list[dict]], list[list[str]]], Sequence[int]]  # (prompts, k answers each) -> picks


def roll_out(generator: Generator, dialogues: Sequence[Sequence[Any]], user_turns: Sequence[Sequence[str]],
             params: SamplingParams, *, decorate_user: Decorate | None = None, k: int = 1,
             choose: Choose | None = None) -> list[list[str]]:
    """The model's answers, ``result[i][t]`` to user turn ``t`` (0-based) of dialogue ``i``.

    ``dialogues[i]``: the messages before the first user turn (a system message, or none); dicts or
    ``data_schemas.Message``. ``user_turns[i]``: the user messages of dialogue i, in order; dialogues may
    have different numbers of turns (a dialogue stops when it runs out). ``decorate_user``, ``k``,
    ``choose``: see the module docstring; ``choose`` gets the prompts of the turn (message dicts ending
    with the decorated user message) and the texts of the ``k`` samples of each, and returns one index
    per prompt.
    """
    if len(dialogues) != len(user_turns):
        raise ValueError(f"{len(dialogues)} dialogues but {len(user_turns)} lists of user turns")
    conversations = [[_as_dict(m) for m in d] for d in dialogues]
    replies: list[list[str]] = [[] for _ in dialogues]
    for t in range(max((len(u) for u in user_turns), default=0)):
        active = [i for i, turns in enumerate(user_turns) if t < len(turns)]
        prompts = []
        for i in active:
            text = user_turns[i][t] if decorate_user is None else decorate_user(i, t, user_turns[i][t])
            conversations[i].append({"role": "user", "content": text})
            prompts.append([dict(m) for m in conversations[i]])
        samples = generator.sample(prompts, k, params)
        if len(samples) != len(prompts):
            raise ValueError(f"the generator returned {len(samples)} results for {len(prompts)} prompts")
        candidates = [[s.text for s in row] for row in samples]
        picks = [0] * len(prompts) if choose is None else list(choose(prompts, candidates))
        if len(picks) != len(prompts):
            raise ValueError(f"choose returned {len(picks)} picks for {len(prompts)} prompts")
        for i, texts, j in zip(active, candidates, picks, strict=True):
            if not 0 <= j < len(texts):
                raise IndexError(f"choose picked sample {j} of {len(texts)}")
            replies[i].append(texts[j])
            conversations[i].append({"role": "assistant", "content": texts[j]})
    return replies
