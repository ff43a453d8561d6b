"""The built-in world's data generator, evaluation suite and ``align data world`` command."""

import json
import random
from collections import defaultdict

import pytest

from align.cli import main
from align.data.builtin import BUILTIN_PREFERENCE, BUILTIN_PROMPTS, BUILTIN_SFT
from data_schemas import read_jsonl
from world.evaluator import as_messages, evaluate_policy
from world.generator import (
    TRAPS,
    eval_prompt_records,
    is_trap,
    preference_records,
    prompt_records,
    respond,
    sft_records,
    split_of,
    strength_of,
)
from world.judge import judge, read_prompt
from world.tasks import BENIGN_VERBS, FAMILIES, HARMFUL_VERBS, HELPFULNESS_FAMILIES, OBJECTS, REFUSAL, Task


def dumps(records):
    return [r.model_dump_json() for r in records]


def test_generators_are_deterministic_by_seed():
    for make in (sft_records, prompt_records, eval_prompt_records, BUILTIN_PREFERENCE["world"]):
        assert dumps(make(40, 3)) == dumps(make(40, 3))
        assert dumps(make(40, 3)) != dumps(make(40, 4))


def test_preferences_ranked_by_the_gold_judge_with_strength_from_the_closest_gap():
    for domain in ("helpfulness", "safety"):
        records = preference_records(150, 0, domain)
        assert any(r.edited for r in records) and any(len(r.responses) == 3 for r in records)
        for r in records:
            scores = [judge(r.prompt, m.content).score for m in r.responses]
            assert scores == r.meta["gold_scores"]
            assert all(a > b for a, b in zip(scores, scores[1:], strict=False))  # strictly best first
            assert r.strength == strength_of(min(a - b for a, b in zip(scores, scores[1:], strict=False)))
            assert r.domain == domain and (read_prompt(r.prompt)[0].spec.domain == domain)
            if r.edited:
                assert len(r.responses) == 3 and scores[0] == 1.0


def test_sft_data_is_deliberately_imperfect():
    last = [(r.conversation()[:-1], r.messages[-1].content) for r in sft_records(600, 0)]
    judged = [judge(p, a) for p, a in last]
    harmful = [j for j in judged if j.harmful]
    lookalikes = [j for j in judged if j.is_safety_prompt and not j.harmful]
    helpful = [j for j in judged if not j.is_safety_prompt]
    assert 0.15 <= sum(j.violation for j in harmful) / len(harmful) <= 0.35
    assert 0.1 <= sum(j.over_refusal for j in lookalikes) / len(lookalikes) <= 0.3
    assert 0.1 <= sum(j.kind != "correct" for j in helpful) / len(helpful) <= 0.3


def test_sft_mistakes_on_trap_items_are_systematic():
    answers = defaultdict(set)  # trap item -> its distinct SFT answers (single turn, no instruction)
    judged = defaultdict(list)  # family -> gold-judged kinds of those answers
    for r in sft_records(3000, 0):
        if len(r.messages) == 2:
            task, _ = read_prompt(r.messages[:1])
            if is_trap(task):
                answers[task.family, tuple(sorted(task.fields.items()))].add(r.messages[1].content)
                judged[task.family].append(judge(r.messages[:1], r.messages[1].content).score == 1.0)
    assert set(judged) == set(TRAPS)
    assert all(len(a) <= 2 for a in answers.values())  # the gold answer and always the same mistake
    ok = [x for family in judged.values() for x in family]
    assert 0.3 < sum(ok) / len(ok) < 0.5  # the mistake about 60% of the time


def test_eval_prompts_are_held_out_and_distinct():
    held = eval_prompt_records(120, 0)
    assert len(held) == 120 and len({tuple(m.content for m in r.prompt) for r in held}) == 120
    train_texts = {m.content for r in prompt_records(400, 5) for m in r.prompt if m.role == "user"}
    train_texts |= {m.content for r in sft_records(400, 5) for m in r.messages if m.role == "user"}
    for r in held:
        task, _ = read_prompt(r.prompt)
        assert split_of(task) == "eval" and r.prompt[-1].content not in train_texts
        assert ("safety" in r.tags) == (task.spec.domain == "safety") and r.meta["family"] == task.family


def test_training_split_covers_every_verb_and_object():
    for family, verbs in (("harmful_act", HARMFUL_VERBS), ("benign_act", BENIGN_VERBS)):
        seen = [(v, o) for v in verbs for o in OBJECTS if split_of(Task(family, {"verb": v, "obj": o})) == "train"]
        assert {v for v, _ in seen} == set(verbs) and {o for _, o in seen} == set(OBJECTS)


def test_builtins_registered():
    assert set(BUILTIN_SFT) >= {"chat", "world"}
    assert set(BUILTIN_PREFERENCE) == {"chat", "world", "world_helpful", "world_safety"}
    assert set(BUILTIN_PROMPTS) == {"world", "world_eval"}
    assert {r.domain for r in BUILTIN_PREFERENCE["world"](10, 0)} == {"helpfulness", "safety"}
    assert len(BUILTIN_PROMPTS["world_eval"](8, 1)) == 8 and len(BUILTIN_SFT["world"](5, 1)) == 5


def test_cli_writes_the_world(tmp_path, capsys):
    assert main(["data", "world", "--out", str(tmp_path), "--size", "small", "--seed", "1"]) == 0
    info = json.loads((tmp_path / "world.json").read_text())
    kinds = {"sft.jsonl": "sft", "prefs_helpful.jsonl": "preference", "prefs_safety.jsonl": "preference",
             "prompts.jsonl": "prompt", "eval_prompts.jsonl": "prompt"}
    for name, kind in kinds.items():
        assert len(read_jsonl(tmp_path / name, kind)) == info["counts"][name] > 0
    assert 0 < info["sft_gold"]["safety_violation_rate"] < 1
    assert "sft.jsonl" in capsys.readouterr().out


def gold_policy(prompts):
    """The gold answers (refuse harmful requests, answer the rest, follow the instruction)."""
    out = []
    for p in prompts:
        task, instructions = read_prompt(p)
        out.append(respond(task, "gold", random.Random(0), instructions[0] if instructions else None))
    return out


@pytest.fixture(scope="module")
def held_out():
    return eval_prompt_records(100, 0)


def test_evaluate_policy_perfect(held_out):
    m = evaluate_policy(gold_policy, held_out)
    assert m["gold_helpfulness"] == m["gold_score"] == m["instruction_following"] == 1.0
    assert m["safety_violation_rate"] == m["over_refusal_rate"] == 0.0
    assert all(v == 1.0 for k, v in m.items() if k.startswith("accuracy/"))
    assert m["n"] == 100 and sum(v for k, v in m.items() if k.startswith("n/")) == 100


def test_evaluate_policy_always_refuse_and_always_comply(held_out):
    refuse = evaluate_policy(lambda ps: [REFUSAL] * len(ps), held_out)
    assert refuse["safety_violation_rate"] == 0.0 and refuse["over_refusal_rate"] == 1.0
    assert refuse["gold_helpfulness"] == 0.0 and refuse["helpfulness_refusal_rate"] == 1.0
    assert refuse["accuracy/harmful_act"] == 1.0
    comply = evaluate_policy(lambda ps: ["Use soap."] * len(ps), held_out)
    assert comply["safety_violation_rate"] == 1.0 and comply["over_refusal_rate"] == 0.0
    assert 0 < comply["gold_helpfulness"] < 0.5


def test_evaluate_policy_scorers_kl_and_prompt_forms(held_out):
    seen = {}

    def generate(prompts):
        seen["prompts"] = prompts
        return gold_policy(prompts)

    m = evaluate_policy(generate, [r.prompt for r in held_out[:10]],
                        scorers={"len": lambda ps, rs: [len(r) for r in rs]}, kl=lambda ps, rs: 0.25)
    assert seen["prompts"] == [as_messages(r) for r in held_out[:10]]
    assert all(isinstance(m, dict) for p in seen["prompts"] for m in p)
    assert m["kl"] == 0.25 and m["reward/len"] > 0
    with pytest.raises(ValueError, match="returned 1 responses for 10 prompts"):
        evaluate_policy(lambda ps: ["x"], held_out[:10])


def test_held_out_phrasings_rotate_so_every_frame_is_trained():
    """Each family holds out one template; its opening words are trained on in some other family."""
    from world.generator import HELD_OUT_TEMPLATE

    def frame(text: str) -> str:
        return " ".join(text.split()[:2])

    trained = {frame(FAMILIES[f].prompts[i]) for f in HELD_OUT_TEMPLATE
               for i in range(len(FAMILIES[f].prompts)) if i != HELD_OUT_TEMPLATE[f]}
    assert set(HELD_OUT_TEMPLATE) == set(HELPFULNESS_FAMILIES)
    for family, i in HELD_OUT_TEMPLATE.items():
        assert split_of(Task(family, {}, i)) == "eval"
        assert frame(FAMILIES[family].prompts[i]) in trained, family
