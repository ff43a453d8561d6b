"""Multi-turn instruction retention: instruction combinations and their split, dialogues, per-turn grading
and metrics (world.retention); multi-turn roll-outs (align.generation.dialogue); attention on
the instruction's tokens (align.models.attention); the evaluation stage's retention pass with a fake
generator (placement honoured)."""

import json
import math

import pytest
import torch

from align.config.evaluation import RetentionEval
from align.config.sampling import SamplingParams
from align.generation import Sample
from align.generation.dialogue import roll_out
from world.generator import split_of
from world.judge import judge
from world.retention import (
    KIND_ORDER,
    RetentionDialogue,
    combination_split,
    combination_text,
    first_turn_messages,
    follow_all,
    grade_dialogue,
    instruction_combinations,
    retention_dialogues,
    retention_metrics,
    satisfiable,
    transcript,
    turn_messages,
)
from world.tasks import HELPFULNESS_FAMILIES, Instruction, parse_task

UPPER = (Instruction("upper"),)


def dialogue(combo=UPPER, turns=("What is 2 plus 3?", "Name the capital of Zorbia.", "Tell me 1 plus 1.")):
    return RetentionDialogue(combination_text(combo), tuple(combo), list(turns))


# ---------------------------------------------------------------- combinations and split


def test_combinations_cover_every_mix_of_distinct_kinds_in_a_stable_order():
    combos = instruction_combinations()
    # 7 singles, 4 + 2 + 8 pairs, 8 triples: every one can be followed by a correct answer
    assert len(combos) == 29 == len(set(combos))
    assert combos == instruction_combinations()
    assert [len(c) for c in combos] == sorted(len(c) for c in combos)
    for c in combos:
        kinds = [i.kind for i in c]
        assert len(set(kinds)) == len(kinds) and kinds == sorted(kinds, key=KIND_ORDER.index)
    assert combination_text((Instruction("max_words", "3"), Instruction("upper"))) == (
        "Always answer in upper case. Always answer in at most 3 words.")


def test_every_combination_is_followed_by_a_correct_answer_to_every_helpfulness_task():
    import random

    from world.generator import random_task

    rng = random.Random(0)
    for combo in instruction_combinations():
        for family in HELPFULNESS_FAMILIES:
            task = random_task(family, rng)
            j = judge([{"role": "system", "content": combination_text(combo)},
                       {"role": "user", "content": task.prompt}], follow_all(combo, task))
            assert j.kind == "correct" and j.instruction_ok, (combo, task.prompt)
    # an unsatisfiable mix is detected: one word cannot carry an answer and an end word
    assert not satisfiable((Instruction("end_word", "done"), Instruction("max_words", "1")))


def test_split_holds_out_about_a_quarter_with_every_kind_on_both_sides():
    combos = instruction_combinations()
    held = [c for c in combos if combination_split(c) == "eval"]
    train = [c for c in combos if combination_split(c) == "train"]
    assert 0.15 <= len(held) / len(combos) <= 0.35
    for side in (held, train):
        assert {i.kind for c in side for i in c} == set(KIND_ORDER)
    assert {1, 2} <= {len(c) for c in held}
    assert [combination_split(c) for c in combos] == [combination_split(c) for c in instruction_combinations()]


# ---------------------------------------------------------------- dialogues


def test_dialogues_are_deterministic_held_out_and_benign():
    a = retention_dialogues(12, 5, seed=3)
    assert a == retention_dialogues(12, 5, seed=3)
    assert a != retention_dialogues(12, 5, seed=4)
    for d in a:
        assert combination_split(d.combo) == "eval" and d.instruction == combination_text(d.combo)
        assert len(d.user_turns) == 5 == len(set(d.user_turns))
        for q in d.user_turns:
            task = parse_task(q)
            assert task.family in HELPFULNESS_FAMILIES and split_of(task) == "eval"
    assert len({d.combo for d in a}) == 7  # dealt in rounds: every held-out combination is used
    for d in retention_dialogues(8, 3, seed=0, split="train"):
        assert combination_split(d.combo) == "train"
        assert all(split_of(parse_task(q)) == "train" for q in d.user_turns)


def test_messages_by_placement():
    d = dialogue()
    assert first_turn_messages(d, "system") == [{"role": "system", "content": d.instruction},
                                                {"role": "user", "content": "What is 2 plus 3?"}]
    assert first_turn_messages(d, "first_user") == [
        {"role": "user", "content": d.instruction + " What is 2 plus 3?"}]
    m = turn_messages(d, "first_user", ["5.", "x"], 3)
    assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant", "user"]
    assert m[2]["content"] == "Name the capital of Zorbia." and m[-1]["content"] == "Tell me 1 plus 1."
    assert transcript(d, "system", ["5.", "x"]) == turn_messages(d, "system", ["5."], 2) + [
        {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError):
        turn_messages(d, "system", [], 2)
    with pytest.raises(ValueError):
        first_turn_messages(d, "nowhere")


# ---------------------------------------------------------------- grading and metrics


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_grades_read_the_first_turn_instruction_at_every_turn(placement):
    d = dialogue()
    grades = grade_dialogue(d, ["2 PLUS 3 IS 5.", "The answer is Kelm.", "1 PLUS 1 IS 3."], placement)
    assert grades == [(True, True), (False, True), (True, False)]
    # the judge sees the instruction at turn 2 even though only turn 1 states it
    assert judge(turn_messages(d, placement, ["2 PLUS 3 IS 5."], 2), "The answer is Kelm.").instruction_ok is False
    # several instructions: all must hold
    d2 = dialogue((Instruction("end_word", "done"), Instruction("max_words", "3")))
    assert grade_dialogue(d2, ["5, done.", "The answer is Kelm, done.", "2."], placement) == [
        (True, True), (False, True), (False, True)]


def test_metrics_on_a_hand_built_example():
    d = dialogue()
    responses = [
        ["2 PLUS 3 IS 5.", "THE ANSWER IS KELM.", "1 PLUS 1 IS 2."],  # followed, all correct
        ["2 PLUS 3 IS 5.", "The answer is Kelm.", "1 plus 1 is 3."],  # followed at turn 1 only; turn 3 wrong
        ["5.", "THE ANSWER IS MIRR.", "2."],  # turn 2 wrong; "5." and "2." have no lower-case letter
        ["5.", "nope"],  # stopped after two turns
    ]
    m = retention_metrics([d] * 4, responses, "system", [1, 2, 3])
    assert m["retention/n"] == 4
    assert m["retention/instruction_turn_1"] == pytest.approx(4 / 4)  # "5." has no lower-case letter
    assert m["retention/task_turn_1"] == pytest.approx(4 / 4)
    assert m["retention/instruction_turn_2"] == pytest.approx(2 / 4)
    assert m["retention/task_turn_2"] == pytest.approx(2 / 4)
    assert m["retention/instruction_turn_3"] == pytest.approx(2 / 3)
    assert m["retention/task_turn_3"] == pytest.approx(2 / 3)
    assert m["retention/instruction_mean"] == pytest.approx(8 / 11)
    assert m["retention/task_mean"] == pytest.approx(8 / 11)


# ---------------------------------------------------------------- roll-outs


class ScriptedGenerator:
    """Answers "<dialogue tag>-<turn>-<sample>" and records every prompt it is given, per call."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, k, params):
        self.calls.append([list(p) for p in prompts])
        out = []
        for p in prompts:
            tag = p[0]["content"].split()[0]
            turn = sum(m["role"] == "user" for m in p)
            out.append([Sample([], f"{tag}-{turn}-{j}", "stop", None) for j in range(k)])
        return out

    def close(self):
        pass


def test_roll_out_feeds_each_turn_the_dialogue_so_far():
    gen = ScriptedGenerator()
    starts = [[{"role": "system", "content": "A sys"}], []]
    users = [["A q1", "A q2", "A q3"], ["B q1"]]
    replies = roll_out(gen, starts, users, SamplingParams(), decorate_user=lambda i, t, x: f"{x}!" if t == 0 else x)
    assert replies == [["A-1-0", "A-2-0", "A-3-0"], ["B-1-0"]]
    assert len(gen.calls) == 3 and [len(c) for c in gen.calls] == [2, 1, 1]  # B stops after its one turn
    assert gen.calls[0] == [[{"role": "system", "content": "A sys"}, {"role": "user", "content": "A q1!"}],
                            [{"role": "user", "content": "B q1!"}]]
    assert gen.calls[2] == [[{"role": "system", "content": "A sys"}, {"role": "user", "content": "A q1!"},
                             {"role": "assistant", "content": "A-1-0"}, {"role": "user", "content": "A q2"},
                             {"role": "assistant", "content": "A-2-0"}, {"role": "user", "content": "A q3"}]]
    assert starts == [[{"role": "system", "content": "A sys"}], []]  # the caller's lists are not changed


def test_roll_out_k_samples_and_choose():
    gen = ScriptedGenerator()
    seen = []

    def choose(prompts, candidates):
        seen.append(candidates)
        return [len(c) - 1 for c in candidates]

    replies = roll_out(gen, [[]], [["X a", "X b"]], SamplingParams(), k=3, choose=choose)
    assert replies == [["X-1-2", "X-2-2"]]
    assert seen[0] == [["X-1-0", "X-1-1", "X-1-2"]]
    assert gen.calls[1][0][1] == {"role": "assistant", "content": "X-1-2"}  # the chosen answer is kept
    with pytest.raises(IndexError):
        roll_out(gen, [[]], [["X a"]], SamplingParams(), k=2, choose=lambda p, c: [5])
    with pytest.raises(ValueError):
        roll_out(gen, [[]], [], SamplingParams())


# ---------------------------------------------------------------- the stage's retention pass (fake generator)


class LastTurnFollower:
    """Answers correctly, and follows the instructions stated in the last user turn only (long answers
    otherwise, which break every held-out combination)."""

    def __init__(self):
        self.prompts = []

    def sample(self, prompts, k, params):
        from world.judge import read_prompt
        from world.tasks import find_instructions

        self.prompts += [list(p) for p in prompts]
        out = []
        for p in prompts:
            task, _ = read_prompt(p)
            stated = find_instructions(p[-1]["content"])
            text = follow_all(stated, task) if stated else task.answer()
            out.append([Sample([], text, "stop", None)] * k)
        return out

    def close(self):
        pass


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_retention_pass_honours_the_placement(tmp_path, placement):
    from align.stages.retention import evaluate_retention

    gen = LastTurnFollower()
    settings = RetentionEval(dialogues=6, turns=3, report_turns=[1, 3], placement=placement, attention=False)
    m = evaluate_retention(gen, settings, out_dir=tmp_path)
    # what the generator saw: the instruction as the system turn, or in front of the first user turn only
    assert len(gen.prompts) == 18
    for p in gen.prompts:
        users = [x["content"] for x in p if x["role"] == "user"]
        assert any(x["role"] == "system" for x in p) == (placement == "system")
        assert [u.startswith("Always") for u in users] == [placement == "first_user"] + [False] * (len(users) - 1)
    # the follower follows what the last user turn states: at turn 1 with first_user placement only
    assert m["retention/instruction_turn_1"] == (1.0 if placement == "first_user" else 0.0)
    assert m["retention/instruction_turn_3"] == 0.0
    assert m["retention/task_turn_1"] == m["retention/task_turn_3"] == 1.0 and m["retention/n"] == 6
    rows = [json.loads(line) for line in open(tmp_path / "retention.jsonl")]
    assert len(rows) == 6 and all(r["placement"] == placement for r in rows)
    first = rows[0]["messages"][0]
    assert first["role"] == ("system" if placement == "system" else "user")
    assert first["content"].startswith(rows[0]["instruction"])
    assert len(rows[0]["messages"]) == 6 + (placement == "system")
    assert rows[0]["task_correct"] == [True] * 3 and "attention" not in rows[0]


# ---------------------------------------------------------------- attention on the instruction


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.data.chat import build_byte_tokenizer

    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


def _conversation():
    d = dialogue()
    return transcript(d, "system", ["2 PLUS 3 IS 5.", "The answer is Kelm.", "2."]), d.instruction


def test_attention_share_matches_a_brute_force_computation(tiny):
    from align.data.chat import tokenize_chat
    from align.models.attention import instruction_attention

    model, tok = tiny
    messages, instruction = _conversation()
    shares = instruction_attention(model, tok, messages, instruction)
    assert len(shares) == 3 and all(0.0 <= s <= 1.0 for s in shares)
    assert model.config._attn_implementation != "eager"  # switched back
    # brute force: positions from the text, attention from a plain eager forward
    chat = tokenize_chat(tok, messages)
    needle = tok(instruction, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(chat.input_ids)) if chat.input_ids[i:i + len(needle)] == needle)
    ins_pos = list(range(start, start + len(needle)))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(torch.tensor([chat.input_ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    turns, current, prev = [], [], False
    for i, m in enumerate(chat.loss_mask):
        if m:
            current.append(i)
        elif prev:
            turns.append(current)
            current = []
        prev = m
    if current:
        turns.append(current)
    assert len(turns) == 3
    for t, queries in enumerate(turns):
        total = 0.0
        for a in att:
            for h in range(a.shape[1]):
                for q in queries:
                    total += float(sum(a[0, h, q, k] for k in ins_pos))
        expected = total / (len(att) * att[0].shape[1] * len(queries))
        assert shares[t] == pytest.approx(expected, rel=1e-4)


def test_attention_share_is_the_token_share_under_uniform_attention(tiny):
    """With zero queries every position attends uniformly to all positions up to itself, so the share at
    query q is (instruction tokens) / (q + 1)."""
    import copy

    from align.data.chat import tokenize_chat
    from align.models.attention import instruction_attention

    model, tok = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        for layer in uniform.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    messages, instruction = _conversation()
    shares = instruction_attention(uniform, tok, messages, instruction)
    chat = tokenize_chat(tok, messages)
    n = len(instruction)  # byte tokens
    queries = [i for i, m in enumerate(chat.loss_mask) if m]
    bounds = [0, *[j for j in range(1, len(queries)) if queries[j] != queries[j - 1] + 1], len(queries)]
    for t in range(3):
        qs = queries[bounds[t]:bounds[t + 1]]
        assert shares[t] == pytest.approx(sum(n / (q + 1) for q in qs) / len(qs), rel=1e-5)
    assert shares[0] > shares[1] > shares[2]
    assert not any(math.isnan(s) for s in shares)


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    from align.stages.retention import plot_retention

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    assert plot_retention(tmp_path / "r.png", [1.0, 0.5], [1.0, 1.0], None) is False
    assert not (tmp_path / "r.png").exists() and "matplotlib is not installed" in capsys.readouterr().out
