"""Data of the built-in world (:mod:`world.tasks`), generated deterministically from a seed.

- SFT seed chats, deliberately imperfect so later stages have something to fix: about 15-20% of
  helpfulness answers are wrong or near misses, 20-25% of harmful requests are complied with, 20-25%
  of benign look-alikes are refused; most of these mistakes are systematic (``TRAPS``). 30% carry a
  system instruction (followed on every turn), 15% have two turns.
- Preference records labelled by the gold judge: 2-3 distinct responses ranked by gold score; 15% are
  Llama 3 style ``edited > chosen > rejected`` (the gold correction first, ``edited=True``). ``strength``
  comes from the smallest gap between neighbours (the margin applies to every pair, so it must hold for
  the closest one): >= 0.75 significantly_better, >= 0.5 better, >= 0.25 slightly_better, else
  negligibly_better. Wrong answers have the right form and length (a plausible number, a near-miss
  word, another entry of the table), so a reward model must learn the task, not a surface cue.
- Prompt pools (tagged ``safety`` for harmful requests and their look-alikes) and held-out evaluation
  prompts. Held-out prompts never occur in training data, for any seed. Helpfulness tasks, which a
  tiny model learns by heart (sums, spellings, the fact tables), are held out by phrasing: one template
  per family is never trained on (``HELD_OUT_TEMPLATE``: "Tell me 3 plus 4.", "What is 5 minus 2?"), while
  its frame is trained on in other families ("Tell me 5 minus 2.", "What is 3 plus 4?"). Safety tasks,
  where the point is a rule (refuse by the verb or the thing made), are held out by content, split by
  a hash with the template left out: "steal a drum" is unseen in every phrasing while "steal" and
  "drum" are seen elsewhere.
"""

from __future__ import annotations

import random
import zlib
from functools import partial

from data_schemas import Message, PreferenceRecord, PromptRecord, SFTRecord
from world.judge import judge
from world.tasks import (
    BENIGN_KINDS,
    BENIGN_SAFETY_FAMILIES,
    BENIGN_VERBS,
    CAPITALS,
    COLORS,
    FAMILIES,
    HARMFUL_FAMILIES,
    HARMFUL_KINDS,
    HARMFUL_VERBS,
    HELPFULNESS_FAMILIES,
    MAX_OPERAND,
    OBJECTS,
    REFUSAL,
    REFUSAL_VARIANTS,
    STEMS,
    WORDS,
    Instruction,
    Task,
    all_instructions,
    apply_instruction,
)

SOURCE = "builtin:world"
# Systematic mistakes of the SFT data: most errors fall on one item per family (a wrong sum or fact, a
# complied-with verb, a refused look-alike), always the same way, so a greedy SFT model inherits them
# and the later stages have something visible to fix; the rest are scattered noise.
TRAPS = {"add": ("a", "5"), "sub": ("a", "5"), "upper": ("w", "fox"), "first_letter": ("w", "owl"),
         "capital": ("c", "Vantor"), "color": ("n", "quax"), "harmful_act": ("verb", "smash"),
         "harmful_make": ("stem", "ember"), "benign_act": ("verb", "wash"), "benign_make": ("kind", "tart")}
TRAP_RATE = 0.6  # chance of the group's mistake on a trap item; elsewhere:
NOISE_RATE = {"helpfulness": 0.12, "harmful": 0.15, "benign": 0.12}
# Share of SFT chats with a system instruction. Copying the end word from the system turn is the slowest
# skill to learn; at 15% a tiny model picks it up in some seeds and not others.
SFT_INSTRUCTION_RATE = 0.3
GROUPS = {"helpfulness": HELPFULNESS_FAMILIES, "harmful": HARMFUL_FAMILIES, "benign": BENIGN_SAFETY_FAMILIES}
# Styles of response the generator can write, with the weights of the imperfect ones per group.
_IMPERFECT = {
    "helpfulness": {"wrong": 4, "partial": 3, "refuse": 1, "off_format": 1},
    "harmful": {"comply": 1},
    "benign": {"refuse": 4, "wrong": 3, "off_format": 1},
}


# The held-out phrasing of each helpfulness family. They differ, so every frame ("What is ...", "Tell me ...")
# is trained on in other families: "Tell me 3 plus 4." is unseen, "Tell me 3 minus 1." and "What is 3 plus
# 4?" are seen. (Holding out one frame in every family asks a tiny model for a phrasing it never read.)
HELD_OUT_TEMPLATE = {"add": 2, "sub": 0, "upper": 2, "first_letter": 1, "capital": 0, "color": 2}


def group_of(task: Task) -> str:
    return "harmful" if task.spec.harmful else task.spec.domain.replace("safety", "benign")


def split_of(task: Task) -> str:
    """"eval" for held-out tasks, else "train" (stable across seeds and Python runs)."""
    if task.spec.domain == "helpfulness":
        return "eval" if task.template == HELD_OUT_TEMPLATE[task.family] else "train"
    return "eval" if zlib.crc32(_key(task).encode()) % 5 == 0 else "train"


def _key(task: Task) -> str:
    """The task's content, without its phrasing."""
    return task.family + ":" + ",".join(f"{k}={v}" for k, v in sorted(task.fields.items()))


def random_task(family: str, rng: random.Random) -> Task:
    template = rng.randrange(len(FAMILIES[family].prompts))
    if family in ("add", "sub"):
        a = rng.randint(0, MAX_OPERAND)
        b = rng.randint(0, MAX_OPERAND if family == "add" else a)
        fields = {"a": str(a), "b": str(b)}
    elif family in ("upper", "first_letter"):
        fields = {"w": rng.choice(WORDS)}
    elif family == "capital":
        fields = {"c": rng.choice(sorted(CAPITALS))}
    elif family == "color":
        fields = {"n": rng.choice(sorted(COLORS))}
    elif family.endswith("make"):
        kinds = HARMFUL_KINDS if family == "harmful_make" else BENIGN_KINDS
        fields = {"stem": rng.choice(STEMS), "kind": rng.choice(sorted(kinds))}
    else:
        verbs = HARMFUL_VERBS if family == "harmful_act" else BENIGN_VERBS
        fields = {"verb": rng.choice(sorted(verbs)), "obj": rng.choice(OBJECTS)}
    return Task(family, fields, template)


def sample_task(rng: random.Random, split: str, group: str | None = None) -> Task:
    """A task of ``split``; ``group`` (helpfulness / harmful / benign) drawn 60/20/20 when not given."""
    if group is None:
        group = rng.choices(list(GROUPS), weights=(0.6, 0.2, 0.2))[0]
    family = rng.choice(GROUPS[group])
    while True:
        task = random_task(family, rng)
        if split_of(task) == split:
            return task


# ---------------------------------------------------------------- responses


def respond(task: Task, style: str, rng: random.Random, ins: Instruction | None = None) -> str:
    """A response of ``style``: gold, partial, wrong, off_format, refuse, comply or ignore_instruction.

    ``gold`` is the refusal for harmful requests and the right answer otherwise; every style but
    ``ignore_instruction`` (the gold response as if no instruction were given) follows ``ins``."""
    if style in ("gold", "ignore_instruction"):
        text = REFUSAL if task.spec.harmful else task.answer()
    elif style == "refuse":
        text = REFUSAL if rng.random() < 0.8 else rng.choice(REFUSAL_VARIANTS)
    elif style == "comply":
        tools = HARMFUL_KINDS if task.family == "harmful_make" else HARMFUL_VERBS
        text = task.answer(None if rng.random() < 0.7 else rng.choice(sorted(tools.values())))
    elif style == "partial":
        near = _near_miss(task, rng)
        text = task.answer(near if near is not None else _wrong(task, rng))
    elif style == "wrong":
        text = task.answer(_wrong(task, rng))
    elif style == "off_format":
        text = rng.choice([task.prompt, "I don't know.", task.answer().rsplit(" ", 1)[0], "Let me think."])
    else:
        raise ValueError(f"unknown response style {style!r}")
    return text if style == "ignore_instruction" else apply_instruction(ins, task, text)


def _near_miss(task: Task, rng: random.Random) -> str | None:
    gold = task.slot
    if task.family in ("add", "sub"):
        d = rng.choice((1, 2))
        return str(int(gold) + d if int(gold) < d or rng.random() < 0.5 else int(gold) - d)
    if task.family == "upper":
        return rng.choice((task.fields["w"], task.fields["w"].capitalize()))
    return None


def _wrong(task: Task, rng: random.Random) -> str:
    gold, fam = task.slot, task.family
    if fam in ("add", "sub"):
        d = rng.randint(3, 6)
        return str(int(gold) + d if int(gold) < d or rng.random() < 0.5 else int(gold) - d)
    if fam == "upper":
        return rng.choice([x for x in WORDS if x != task.fields["w"]]).upper()
    if fam == "first_letter":
        w = task.fields["w"]
        return rng.choice([c for c in w[1:] if c != w[0]] or ["x"])
    table = {"capital": CAPITALS, "color": COLORS}.get(fam)
    if table is None:
        table = BENIGN_KINDS if fam.endswith("make") else BENIGN_VERBS
    return rng.choice(sorted(v for v in set(table.values()) if v != gold))


# ---------------------------------------------------------------- records


def _prompt(rng: random.Random, split: str, group: str | None, ins_p: float, turns2_p: float):
    """-> (messages ending with a user turn, the last task, the instruction or None)."""
    ins = rng.choice(all_instructions()) if rng.random() < ins_p else None
    msgs = [Message(role="system", content=ins.text)] if ins else []
    if rng.random() < turns2_p:
        first = sample_task(rng, split)
        msgs += [Message(role="user", content=first.prompt),
                 Message(role="assistant", content=respond(first, "gold", rng, ins))]
    task = sample_task(rng, split, group)
    return msgs + [Message(role="user", content=task.prompt)], task, ins


def is_trap(task: Task) -> bool:
    name, value = TRAPS[task.family]
    return task.fields[name] == value


def _sft_response(task: Task, rng: random.Random, ins: Instruction | None) -> tuple[str, str]:
    """-> (style, text) of an SFT answer: gold, or the group's mistake at the item's error rate."""
    trap, group = is_trap(task), group_of(task)
    r = rng.random()
    if r >= (TRAP_RATE if trap else NOISE_RATE[group]):
        return "gold", respond(task, "gold", rng, ins)
    style = {"harmful": "comply", "benign": "refuse"}.get(group, "wrong" if trap or r < 0.06 else "partial")
    # a trap item is got wrong the same way every time, so the mistake is learnable
    return style, respond(task, style, random.Random(_key(task)) if trap else rng, ins)


def sft_records(n: int, seed: int = 0) -> list[SFTRecord]:
    """Imperfect SFT seed chats of the world (1-2 turns, some with a system instruction)."""
    rng = random.Random(f"world-sft:{seed}")
    records = []
    for i in range(n):
        ins = rng.choice(all_instructions()) if rng.random() < SFT_INSTRUCTION_RATE else None
        msgs = [Message(role="system", content=ins.text)] if ins else []
        families, styles = [], []
        for _ in range(2 if rng.random() < 0.15 else 1):
            task = sample_task(rng, "train")
            style, text = _sft_response(task, rng, ins)
            msgs += [Message(role="user", content=task.prompt), Message(role="assistant", content=text)]
            families.append(task.family)
            styles.append(style)
        records.append(SFTRecord(messages=msgs, source=SOURCE,
                                 meta={"index": i, "families": families, "styles": styles}))
    return records


def strength_of(gap: float) -> str:
    if gap >= 0.75:
        return "significantly_better"
    if gap >= 0.5:
        return "better"
    return "slightly_better" if gap >= 0.25 else "negligibly_better"


def _ranked(prompt: list[Message], task: Task, ins: Instruction | None, rng: random.Random):
    """-> (responses best first, their gold scores, their styles, edited) or None."""
    gold_text = respond(task, "gold", rng, ins)
    gold_score = judge(prompt, gold_text).score
    weights = dict(_IMPERFECT[group_of(task)])
    if ins is not None:
        weights["ignore_instruction"] = 3
    pool: dict[float, tuple[str, str]] = {}  # one response per distinct score below gold
    for _ in range(10):
        style = rng.choices(list(weights), weights=list(weights.values()))[0]
        text = respond(task, style, rng, ins)
        score = judge(prompt, text).score
        if score < gold_score and score not in pool:
            pool[score] = (text, style)
    edited = len(pool) >= 2 and rng.random() < 0.15
    with_gold = edited or len(pool) < 2 or rng.random() < 0.8
    k = 3 if edited or rng.random() < 0.3 else 2
    picked = rng.sample(sorted(pool), min(len(pool), k - with_gold))
    ranked = sorted(((s, *pool[s]) for s in picked), reverse=True)
    if with_gold:
        ranked.insert(0, (gold_score, gold_text, "gold"))
    if len(ranked) < 2:
        return None
    scores, texts, styles = zip(*ranked, strict=True)
    return list(texts), list(scores), list(styles), edited


def preference_records(n: int, seed: int = 0, domain: str = "helpfulness") -> list[PreferenceRecord]:
    """Gold-ranked preference records of one domain (helpfulness, or safety: harmful requests and
    benign look-alikes half and half)."""
    if domain not in ("helpfulness", "safety"):
        raise ValueError(f"domain must be 'helpfulness' or 'safety', got {domain!r}")
    rng = random.Random(f"world-prefs-{domain}:{seed}")
    records: list[PreferenceRecord] = []
    while len(records) < n:
        group = "helpfulness" if domain == "helpfulness" else rng.choice(("harmful", "benign"))
        prompt, task, ins = _prompt(rng, "train", group, ins_p=0.2, turns2_p=0.15)
        ranked = _ranked(prompt, task, ins, rng)
        if ranked is None:
            continue
        texts, scores, styles, edited = ranked
        gap = min(a - b for a, b in zip(scores, scores[1:], strict=False))
        records.append(PreferenceRecord(
            prompt=prompt, responses=[Message(role="assistant", content=t) for t in texts],
            strength=strength_of(gap), edited=edited, domain=domain, source=SOURCE,
            meta={"index": len(records), "family": task.family, "gold_scores": scores, "styles": styles},
        ))
    return records


def _tags(task: Task) -> list[str]:
    extra = ["harmful"] if task.spec.harmful else ["borderline"] if task.spec.domain == "safety" else []
    return [task.spec.domain, *extra, task.family]


def prompt_records(n: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
    """Prompt pool (for rejection sampling, PPO): tags ``[domain, harmful|borderline, family]``."""
    rng = random.Random(f"world-prompts-{split}:{seed}")
    records = []
    for i in range(n):
        prompt, task, _ = _prompt(rng, split, None, ins_p=0.2, turns2_p=0.15)
        records.append(PromptRecord(prompt=prompt, tags=_tags(task), source=SOURCE,
                                    meta={"index": i, "family": task.family, "split": split}))
    return records


def eval_prompt_records(n: int, seed: int = 0) -> list[PromptRecord]:
    """Held-out prompts, distinct texts: half helpfulness, a quarter harmful, a quarter look-alikes
    (fewer if a group runs out of distinct held-out prompts)."""
    rng = random.Random(f"world-eval:{seed}")
    quotas = {"helpfulness": n - 2 * (n // 4), "harmful": n // 4, "benign": n // 4}
    seen: set[tuple[str, ...]] = set()
    records = []
    for group, quota in quotas.items():
        taken, misses = 0, 0
        while taken < quota and misses < 500:
            prompt, task, _ = _prompt(rng, "eval", group, ins_p=0.25, turns2_p=0.1)
            key = tuple(m.content for m in prompt)
            if key in seen:
                misses += 1
                continue
            seen.add(key)
            taken += 1
            records.append(PromptRecord(prompt=prompt, tags=_tags(task), source=SOURCE,
                                        meta={"index": len(records), "family": task.family, "split": "eval"}))
    return records


def world_preference_records(n: int, seed: int = 0) -> list[PreferenceRecord]:
    """``builtin: world`` preferences: both domains, helpfulness records first, then safety (half each)."""
    return preference_records(n - n // 2, seed, "helpfulness") + preference_records(n // 2, seed, "safety")


helpful_preference_records = partial(preference_records, domain="helpfulness")  # builtin: world_helpful
safety_preference_records = partial(preference_records, domain="safety")  # builtin: world_safety
