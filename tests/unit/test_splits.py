"""Held-out splits are by prompt in every stage that holds data out: no prompt is in both splits."""

from __future__ import annotations

from align.config.specs import DataSpec
from align.data.preference import load_preferences
from align.data.sources import load_sft, prompt_key, split_by_prompt
from data_schemas import Message, PreferenceRecord, SFTRecord


def U(text):
    return Message(role="user", content=text)


def A(text):
    return Message(role="assistant", content=text)


def test_preference_records_sharing_a_prompt_stay_together(tmp_path):
    from data_schemas import write_jsonl

    # 30 prompts x 4 records each (several pairs per prompt, as annotation produces)
    rows = [PreferenceRecord(prompt=[U(f"What is {i} plus 1?")], responses=[A(f"{i + 1}."), A(f"{i + j}.")])
            for i in range(30) for j in range(2, 6)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    path = str(tmp_path / "p.jsonl")
    records = load_preferences(DataSpec(paths=[path]), [path], seed=0)
    train, held = split_by_prompt(records, 0.2, seed=0)
    train_prompts, held_prompts = {prompt_key(r) for r in train}, {prompt_key(r) for r in held}
    assert not train_prompts & held_prompts
    assert len(held_prompts) == 6 and len(held) == 24 and len(train) + len(held) == 120


def test_sft_chats_sharing_a_first_user_turn_stay_together():
    spec = DataSpec(builtin="world", builtin_size=600, eval_fraction=0.1)
    train, held = load_sft(spec, [], seed=3)
    assert held and not {prompt_key(r) for r in train} & {prompt_key(r) for r in held}
    assert len({prompt_key(r) for r in train + held}) < 600  # the world repeats prompts: the old split leaked


def test_the_key_folds_case_and_space_and_ignores_later_turns():
    a = SFTRecord(messages=[U("Hi  there"), A("x"), U("more"), A("y")])
    b = SFTRecord(messages=[U("hi there"), A("z")])
    assert prompt_key(a) == prompt_key(b)
    train, held = split_by_prompt([a, b], 0.5, seed=0)
    assert (len(train), len(held)) in ((0, 2), (2, 0))


def test_reward_model_and_dpo_use_the_same_split():
    import align.train.dpo as dpo
    import align.train.reward_model as reward_model

    assert reward_model.split_by_prompt is dpo.split_by_prompt is split_by_prompt


def test_sample_takes_a_seeded_subset_in_file_order_after_limit(tmp_path):
    from align.data.sources import load_prompts
    from data_schemas import write_jsonl

    rows = [PreferenceRecord(prompt=[U(f"Q{i}?")], responses=[A("yes"), A("no")]) for i in range(40)]
    path = str(tmp_path / "p.jsonl")
    write_jsonl(path, rows)

    def ids(spec, seed=0):
        return [int(prompt_key(r)[1:-1]) for r in load_prompts(spec, [path], seed)]

    picked = ids(DataSpec(paths=[path], sample=10))
    assert len(picked) == 10 and picked == sorted(picked) and picked != list(range(10))
    assert ids(DataSpec(paths=[path], sample=10)) == picked  # seeded
    assert ids(DataSpec(paths=[path], sample=10), seed=1) != picked
    assert set(ids(DataSpec(paths=[path], limit=20, sample=10))) <= set(range(20))
    assert ids(DataSpec(paths=[path], sample=100)) == list(range(40))
    records = load_preferences(DataSpec(paths=[path], sample=10, eval_fraction=0.2), [path], seed=0)
    assert sorted(int(prompt_key(r)[1:-1]) for r in records) == picked


def test_train_sample_shrinks_the_training_split_only_and_nests():
    """``data.train_sample``: a learning curve's sizes share one held-out split; a smaller training set is
    part of a larger one; records stay in file order."""
    records = [PreferenceRecord(prompt=[U(f"Question {i}?")], responses=[A(f"yes {i}"), A(f"no {i}")])
               for i in range(100)]
    full_train, held = split_by_prompt(records, 0.2, seed=4)
    splits = {n: split_by_prompt(records, 0.2, seed=4, train_sample=n) for n in (10, 40, 80, 500)}
    for n, (train, h) in splits.items():
        assert h == held and len(train) == min(n, len(full_train))
        assert [records.index(r) for r in train] == sorted(records.index(r) for r in train)
    assert {id(r) for r in splits[10][0]} < {id(r) for r in splits[40][0]} < {id(r) for r in splits[80][0]}
    assert splits[500][0] == full_train
    assert split_by_prompt(records, 0.2, seed=5, train_sample=10)[0] != splits[10][0]  # seeded
    # without a held-out split it samples the records
    assert len(split_by_prompt(records, 0.0, seed=0, train_sample=7)[0]) == 7
    assert len(load_sft(DataSpec(builtin="world", builtin_size=200, eval_fraction=0.1, train_sample=25), [],
                        seed=0)[0]) == 25
