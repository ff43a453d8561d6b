"""A data spec may name a built-in set together with files or stages: the built-in records come first,
then the files' (how a recipe replays SFT chats beside an earlier stage's data)."""

import pytest
from pydantic import ValidationError

from align.config.specs import DataSpec
from align.data.preference import load_preferences
from align.data.sources import describe_sources, load_prompts, load_sft
from data_schemas import Message, PreferenceRecord, SFTRecord, write_jsonl


def _chat(i):
    return SFTRecord(messages=[Message(role="user", content=f"file question {i}"),
                               Message(role="assistant", content=f"file answer {i}")])


def test_sft_builtin_and_files_are_both_read_builtin_first(tmp_path):
    path = tmp_path / "gatt.jsonl"
    write_jsonl(path, [_chat(i) for i in range(3)])
    spec = DataSpec(builtin="world_chat", builtin_size=5, paths=[str(path)])
    train, held = load_sft(spec, [str(path)], seed=0)
    records = train + held
    assert len(records) == 8
    assert [r.messages[0].content for r in records[-3:]] == [f"file question {i}" for i in range(3)]
    alone, _ = load_sft(DataSpec(builtin="world_chat", builtin_size=5), [], seed=0)
    assert records[:5] == alone
    assert describe_sources(spec, [str(path)]) == f"the built-in set 'world_chat', {path}"


def test_preferences_and_prompts_combine_the_same_way(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rec = PreferenceRecord(prompt=[Message(role="user", content="file prompt")],
                           responses=[Message(role="assistant", content="yes"),
                                      Message(role="assistant", content="no")])
    write_jsonl(path, [rec])
    records = load_preferences(DataSpec(builtin="chat", builtin_size=4, paths=[str(path)]), [str(path)], 0)
    assert len(records) == 5
    assert any(r.prompt[0].content == "file prompt" for r in records)
    prompts = load_prompts(DataSpec(builtin="world", builtin_size=6, paths=[str(path)]), [str(path)], 0)
    assert len(prompts) == 7


def test_a_spec_needs_a_source_and_a_builtin_counts_for_round_one():
    with pytest.raises(ValidationError, match="give 'paths', 'from', 'builtin', 'hf' or 'mix'"):
        DataSpec()
    with pytest.raises(ValidationError, match="previous-round"):
        DataSpec(**{"from": "prev.rs"})
    DataSpec(builtin="world_chat", **{"from": "prev.rs"})  # round 1 reads the built-in set alone
