"""Ghost Attention data, checked by hand: where the instruction is kept, which answers carry loss (token
by token on a 3-turn dialogue), and the ``weight`` field of the SFT schema."""

from __future__ import annotations

import json
import random

import pytest

from align.config.gatt import ConstraintGroup, InstructionPool
from align.data.chat import build_byte_tokenizer, tokenize_chat
from align.data.gatt import DialoguePlan, attach, draw_instruction, gatt_record, plan_dialogues
from data_schemas import DataError, SFTRecord, parse_record, read_jsonl, write_jsonl

PLAN = DialoguePlan(users=["What is 1 plus 2?", "Spell cat.", "Capital of Quenta?"],
                    instruction="Always answer in upper case.", kept="Always answer in upper case.",
                    names=["upper"])
ANSWERS = ["1 PLUS 2 IS 3.", "C A T.", "MIRR."]


def test_the_instruction_is_kept_in_the_first_turn_only():
    system = gatt_record(PLAN, ANSWERS, "system", "last")
    assert [(m.role, m.content) for m in system.messages] == [
        ("system", "Always answer in upper case."),
        ("user", "What is 1 plus 2?"), ("assistant", "1 PLUS 2 IS 3."),
        ("user", "Spell cat."), ("assistant", "C A T."),
        ("user", "Capital of Quenta?"), ("assistant", "MIRR."),
    ]
    first_user = gatt_record(PLAN, ANSWERS, "first_user", "last")
    assert [m.role for m in first_user.messages] == ["user", "assistant"] * 3
    assert first_user.messages[0].content == "Always answer in upper case. What is 1 plus 2?"
    assert [m.content for m in first_user.messages[2::2]] == ["Spell cat.", "Capital of Quenta?"]
    # while sampling, the model sees the instruction before every user message
    assert attach(PLAN.instruction, "Spell cat.") == "Always answer in upper case. Spell cat."


def test_loss_only_on_the_last_answer_token_by_token():
    tok = build_byte_tokenizer()
    record = gatt_record(PLAN, ANSWERS, "system", "last")
    assert [m.weight for m in record.messages if m.role == "assistant"] == [0, 0, None]
    chat = tokenize_chat(tok, record.conversation())

    def toks(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    expected = []
    pieces = [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAlways answer in upper case.<|eot_id|>", False)]
    for t, (user, answer) in enumerate(zip(PLAN.users, ANSWERS, strict=True)):
        pieces += [(f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>", False),
                   ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
                   (f"{answer}<|eot_id|>", t == 2)]
    for piece, trained in pieces:
        expected += [trained] * len(toks(piece))
    assert chat.loss_mask == expected
    kept = [i for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]
    assert tok.decode(kept) == "MIRR.<|eot_id|>"
    # loss_on: all -> every answer trained on
    every = tokenize_chat(tok, gatt_record(PLAN, ANSWERS, "system", "all").conversation())
    assert tok.decode([i for i, m in zip(every.input_ids, every.loss_mask, strict=True) if m]) == \
        "1 PLUS 2 IS 3.<|eot_id|>C A T.<|eot_id|>MIRR.<|eot_id|>"


def test_records_round_trip_through_a_file_with_their_weights(tmp_path):
    path = tmp_path / "gatt.jsonl"
    write_jsonl(path, [gatt_record(PLAN, ANSWERS, "first_user", "last")])
    row = json.loads(path.read_text())
    assert [m.get("weight") for m in row["messages"]] == [None, 0, None, 0, None, None]
    assert "weight" not in row["messages"][0]  # unset weights are not written
    back = read_jsonl(path, "sft")[0]
    assert [m.weight for m in back.messages] == [None, 0, None, 0, None, None]


@pytest.mark.parametrize("weight, ok", [(0, True), (1, True), (None, True), (2, False), (-1, False),
                                        (True, False), ("1", False), (0.5, False), (1.0, False)])
def test_weight_is_0_or_1(weight, ok, tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": weight}]}
    if weight is None:
        del row["messages"][1]["weight"]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n" + json.dumps(row) + "\n")
    if ok:
        assert read_jsonl(path, "sft")[1].messages[1].weight == weight
    else:
        with pytest.raises(DataError) as err:
            read_jsonl(path, "sft")
        assert str(err.value).startswith(f"{path}:2: field 'messages.1.weight': must be 0 or 1")


@pytest.mark.parametrize("role, index", [("user", 0), ("system", 0)])
def test_weight_only_on_assistant_messages(role, index, tmp_path):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    if role == "system":
        messages.insert(0, {"role": "system", "content": "s"})
    messages[index]["weight"] = 1
    with pytest.raises(DataError) as err:
        parse_record({"messages": messages}, "sft", path="f.jsonl", line=7)
    assert str(err.value) == (f"f.jsonl:7: field 'messages.{index}.weight': only assistant messages carry a "
                              f"weight (this one is '{role}')")


def test_trl_files_without_weight_train_on_every_answer():
    tok = build_byte_tokenizer()
    record = SFTRecord.model_validate({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    chat = tokenize_chat(tok, record.messages)
    assert tok.decode([i for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]) == \
        "b<|eot_id|>d<|eot_id|>"


GROUPS = [ConstraintGroup(name="hobby", options=["tennis", "chess"], text="You enjoy {option}.",
                          short="Hobby: {option}"),
          ConstraintGroup(name="language", options=["French"], text="Always answer in {option}.")]


def test_user_groups_combine_and_shorten():
    pool = InstructionPool(builtin=None, groups=GROUPS, max_combined=2, shorten=1.0)
    rng = random.Random(0)
    seen = [draw_instruction(pool, rng) for _ in range(40)]
    assert {len(names) for _, _, names in seen} == {1, 2}
    for full, kept, names in seen:
        if names[0].startswith("hobby"):
            assert kept.startswith("Hobby: ") and full.startswith("You enjoy ")
        assert "Always answer in French." in kept or "language:French" not in names  # no short form: kept full
    never = InstructionPool(builtin=None, groups=GROUPS, shorten=0.0)
    assert all(full == kept for full, kept, _ in (draw_instruction(never, rng) for _ in range(20)))


def test_plans_use_the_first_n_user_turns_within_the_bounds():
    from world.chats import dialogue_records

    records = dialogue_records(50, seed=1)
    plans = plan_dialogues(records, InstructionPool(), min_turns=3, max_turns=5, seed=0)
    long_enough = [r for r in records if sum(m.role == "user" for m in r.messages) >= 3]
    assert len(plans) == len(long_enough)
    for plan, record in zip(plans, long_enough, strict=True):
        users = [m.content for m in record.messages if m.role == "user"]
        assert 3 <= len(plan.users) <= 5 and plan.users == users[: len(plan.users)]
    assert plan_dialogues(records, InstructionPool(), 3, 5, seed=0) == plans  # deterministic
    assert plan_dialogues(records, InstructionPool(), 3, 5, seed=1) != plans


def test_world_instructions_never_use_the_combinations_the_evaluation_holds_out():
    from world.retention import (
        combination_split,
        combination_text,
        instruction_combinations,
        training_instructions,
    )

    held_out = {combination_text(c) for c in instruction_combinations() if combination_split(c) == "eval"}
    pool = training_instructions()
    assert held_out and pool and not held_out & {text for text, _ in pool}
    from world.chats import dialogue_records

    plans = plan_dialogues(dialogue_records(200, 0), InstructionPool(), 2, 8, seed=0)
    assert not held_out & {p.instruction for p in plans}


def test_world_chat_data_is_mostly_short_with_long_dialogues_and_instruction_combinations():
    from collections import Counter

    from world.chats import chat_records
    from world.judge import judge
    from world.retention import combination_split, instruction_combinations
    from world.tasks import find_instructions

    records = chat_records(1000, seed=3)
    shapes, placements = Counter(r.meta["shape"] for r in records), Counter()
    assert 0.65 < shapes["short"] / 1000 < 0.75 and 0.1 < shapes["long"] / 1000 < 0.2
    held_out = {tuple(sorted((i.kind, i.arg) for i in c)) for c in instruction_combinations()
                if combination_split(c) == "eval"}
    for r in records:
        users = [m for m in r.messages if m.role == "user"]
        if r.meta["shape"] == "long":
            assert 3 <= len(users) <= 8 and r.messages[0].role == "user"
            assert not any(find_instructions(m.content) for m in r.messages)
        elif r.meta["shape"] == "instruction":  # in a system turn or at the start of the first user message
            where = r.messages[0] if r.messages[0].role == "system" else users[0]
            placements[where.role] += 1
            stated = find_instructions(where.content)
            assert stated and tuple(sorted((i.kind, i.arg) for i in stated)) not in held_out
            unstated = users if where.role == "system" else users[1:]
            assert not any(find_instructions(m.content) for m in unstated)
            for k, m in enumerate(r.messages):
                if m.role == "assistant":  # every answer follows the instructions and is right
                    j = judge(r.messages[:k], m.content)
                    assert j.instruction_ok and j.kind == "correct", (r.messages[:k], m.content)
    assert placements["system"] > 50 and placements["user"] > 50, placements  # about half each of ~150
