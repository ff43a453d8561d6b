"""Continuation prompts from human-written text (issue 30, item 2): prefixes of 6-12 words, only the sources
asked for, split whole by record with no prefix in both splits, deterministic; and on the shared data."""

import json

import pytest

from align.cli import main
from align.data.continuation import (
    INSTRUCTION,
    prefix_of,
    record_prefixes,
    split_records,
    write_continuations,
)
from data_schemas import parse_record, read_jsonl


def row(i: int, source: str = "Topical-Chat (human-human)", turns: int = 2) -> dict:
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"question {i} {t}"},
                     {"role": "assistant", "content": " ".join(f"w{i}_{t}_{k}" for k in range(20))}]
    return {"source": source, "messages": messages}


def test_prefix_words_and_short_texts():
    text = " ".join(f"x{k}" for k in range(30))
    p = prefix_of(text, 6, 12)
    assert text.startswith(p) and 6 <= len(p.split()) <= 12 and prefix_of(text, 6, 12) == p
    assert prefix_of("only five words here now", 6, 12) is None
    assert len(prefix_of(text, 8, 8).split()) == 8  # the bounds are used


def test_sources_exclusions_and_per_record():
    rows = [parse_record(r, "sft") for r in (row(0), row(1, "gsm8k/train (human-written)"),
                                             row(2, "arena (GPT-4 answer)"), row(3, turns=3))]
    groups = record_prefixes(rows, ["human"], ["gsm8k"], 6, 12, per_record=2)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)  # rows 0 and 3, two prefixes each
    assert all(p.startswith(f"w{i}_") for g, i in zip(groups, (0, 3), strict=True) for p in g)
    assert len(record_prefixes(rows, ["human"], [], 6, 12, per_record=1)) == 3  # gsm8k back in


def test_split_is_disjoint_whole_records_and_deterministic():
    groups = [[f"p{i} a b c d e", f"p{i} f g h i j"] for i in range(100)]
    train, held = split_records(groups, 50)
    assert len(held) == 50 and len(train) == 150 and not set(train) & set(held)
    for g in groups:  # a record's prefixes stay together
        assert set(g) <= set(held) or set(g) <= set(train)
    assert split_records(groups, 50) == (train, held)
    assert split_records(groups, 50, salt="other") != (train, held)  # the salt is used
    with pytest.raises(ValueError, match="fewer than the 500"):
        split_records(groups, 500)


def test_command_writes_prompt_records_and_names_a_bad_line(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row(i)) for i in range(40)) + "\n")
    assert main(["data", "continuations", "--data", str(data), "--out", str(tmp_path / "out"), "--heldout", "10"]) == 0
    held = read_jsonl(tmp_path / "out" / "continuation.heldout.jsonl", "prompt")
    train = read_jsonl(tmp_path / "out" / "continuation.train.jsonl", "prompt")
    assert len(held) >= 10 and len(held) + len(train) == 80
    assert all(r.prompt[0].content.startswith(INSTRUCTION) and r.tags[-1] == "heldout" for r in held)
    data.write_text(json.dumps(row(0)) + "\n{not json\n")
    assert main(["data", "continuations", "--data", str(data), "--out", str(tmp_path / "o2")]) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err


def test_shared_human_text_gives_256_held_out_prompts(tmp_path, shared_data):
    counts = write_continuations([str(shared_data / "multiturn.train.jsonl"), str(shared_data / "sft.train.jsonl")],
                                 tmp_path)
    assert counts["heldout"] >= 256 and counts["train"] >= 256
    held = {r.prompt[0].content for r in read_jsonl(tmp_path / "continuation.heldout.jsonl", "prompt")}
    train = {r.prompt[0].content for r in read_jsonl(tmp_path / "continuation.train.jsonl", "prompt")}
    assert not held & train


def test_a_prompt_source_makes_them_in_a_recipe(tmp_path):
    """``prompts: {paths: [...], continuation: {split: ...}}``: the two splits, disjoint, the held-out size asked
    for; without ``continuation`` the same files are read as they are."""
    from align.config.specs import DataSpec
    from align.data.sources import load_prompts

    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row(i)) for i in range(40)) + "\n")
    spec = {"paths": [str(data)], "continuation": {"split": "heldout", "heldout": 10}}
    held = load_prompts(DataSpec.model_validate(spec), [str(data)], seed=0)
    spec["continuation"]["split"] = "train"
    train = load_prompts(DataSpec.model_validate(spec), [str(data)], seed=0)
    texts = [{r.prompt[0].content for r in rs} for rs in (held, train)]
    assert len(held) >= 10 and len(held) + len(train) == 80 and not texts[0] & texts[1]
    assert all(t.startswith(INSTRUCTION) for t in texts[0] | texts[1])
    spec["continuation"].update(min_words=3, max_words=3)
    assert all(len(r.prompt[0].content.removeprefix(INSTRUCTION).split()) == 3
               for r in load_prompts(DataSpec.model_validate(spec), [str(data)], seed=0))
    spec["continuation"].update(per_record=1, heldout=5)
    assert len(load_prompts(DataSpec.model_validate(spec), [str(data)], seed=0)) == 40 - 5  # one per chat
    spec["continuation"].update(sources=["Wikipedia"])
    with pytest.raises(ValueError, match="only 0 prefixes"):  # no row's source has it
        load_prompts(DataSpec.model_validate(spec), [str(data)], seed=0)
    plain = load_prompts(DataSpec.model_validate({"paths": [str(data)]}), [str(data)], seed=0)
    assert not any(r.prompt[-1].content.startswith(INSTRUCTION) for r in plain)


def test_a_continuation_source_is_checked_before_any_work(tmp_path, capsys):
    from align.config.specs import DataSpec

    with pytest.raises(ValueError, match="give 'paths' and no other source"):
        DataSpec.model_validate({"builtin": "world", "continuation": {"split": "train"}})
    with pytest.raises(ValueError, match="min_words is above max_words"):
        DataSpec.model_validate({"paths": ["x"], "continuation": {"split": "train", "min_words": 9, "max_words": 8}})
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row(i)) for i in range(20)) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "t", "stages": [{
        "name": "sft", "kind": "sft", "model": {"path": "builtin:tiny"},
        "data": {"paths": [str(data)], "continuation": {"split": "train"}}}]}))
    assert main(["validate", str(recipe)]) != 0
    assert "stages[sft].data.continuation: makes prompts" in capsys.readouterr().err
