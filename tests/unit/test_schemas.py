"""Tests for data_schemas: record validation, JSONL reading/writing and format adapters."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest

from data_schemas import (
    STRENGTHS,
    DataError,
    Message,
    PreferenceRecord,
    PromptRecord,
    ScoredSample,
    SFTRecord,
    append_jsonl,
    parse_record,
    read_jsonl,
    write_jsonl,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def U(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


def A(text: str = "hello") -> dict:
    return {"role": "assistant", "content": text}


def S(text: str = "be nice") -> dict:
    return {"role": "system", "content": text}


def write_rows(path: Path, *rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- good rows


def test_sft_forms(tmp_path):
    p = write_rows(
        tmp_path / "sft.jsonl",
        {"messages": [U(), A()], "source": "x", "meta": {"id": 1}},
        "",
        {"messages": [S(), U(), A(), U("again"), A("ok")]},
        {"messages": [U(), A()], "system": "sys"},
        {"prompt": [U()], "completion": [A()]},
        {"prompt": "q", "completion": "a"},
    )
    recs = read_jsonl(p, "sft")
    assert len(recs) == 5 and recs.skipped == 0 and recs.errors == []
    assert all(isinstance(r, SFTRecord) for r in recs)
    assert recs[0].source == "x" and recs[0].meta == {"id": 1}
    assert recs[1].messages[0].role == "system"
    assert [m.role for m in recs[2].conversation()] == ["system", "user", "assistant"]
    assert recs[2].conversation()[0].content == "sys" and len(recs[2].messages) == 2
    assert [m.content for m in recs[4].messages] == ["q", "a"]


def test_preference_forms(tmp_path):
    p = write_rows(
        tmp_path / "pref.jsonl",
        {"prompt": [U()], "chosen": [A("good")], "rejected": [A("bad")], "strength": "better", "source": "s"},
        {"prompt": [U()], "responses": [[A("1")], [A("2")], [A("3")]], "meta": {"k": 1}},
        {"prompt": [U()], "responses": [A("1"), A("2")], "edited": True, "domain": "safety"},
        {"chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]},
        {"prompt": "text", "chosen": "good", "rejected": "bad", "strength": None, "margin": 1.5},
    )
    recs = read_jsonl(p, PreferenceRecord)
    assert len(recs) == 5
    assert recs[0].chosen.content == "good" and recs[0].rejected.content == "bad"
    assert recs[0].strength == "better" and recs[0].source == "s" and recs[0].domain == "helpfulness"
    assert [m.content for m in recs[1].responses] == ["1", "2", "3"] and recs[1].rejected.content == "3"
    assert recs[2].edited and recs[2].domain == "safety"
    assert [m.content for m in recs[3].prompt] == ["a", "b", "c"]
    assert [m.content for m in recs[3].responses] == ["good", "bad"]
    assert recs[4].prompt == [Message(role="user", content="text")]
    assert recs[4].strength is None and recs[4].meta == {"margin": 1.5}


def test_prompt_forms(tmp_path):
    p = write_rows(
        tmp_path / "prompts.jsonl",
        {"prompt": [U("x")], "tags": ["safety"], "source": "s"},
        {"prompt": "plain"},
        {"prompt": [U("p")], "chosen": [A()], "rejected": [A("r")], "strength": "better", "domain": "safety"},
        {"prompt": [U("p")], "responses": [[A()], [A("r")], [A("z")]]},
        {"messages": [U("a"), A("b"), U("c"), A("d")], "source": "sft"},
        {"messages": [U("m"), A()], "system": "sys"},
        {"chosen": [U("i"), A("good")], "rejected": [U("i"), A("bad")]},
    )
    recs = read_jsonl(p, "prompt")
    assert all(isinstance(r, PromptRecord) for r in recs) and len(recs) == 7
    assert recs[0].is_safety and not recs[1].is_safety
    assert recs[1].prompt[0].content == "plain"
    assert recs[2].is_safety and recs[2].prompt[0].content == "p"
    assert [m.content for m in recs[4].prompt] == ["a", "b", "c"] and recs[4].source == "sft"
    assert [m.role for m in recs[5].prompt] == ["system", "user"]
    assert recs[6].prompt[0].content == "i"


def test_scored_and_write_roundtrip(tmp_path):
    sample = ScoredSample(prompt=[U()], response=A(), score=0.5, scores={"helpful": 0.5})
    recs = [
        SFTRecord(messages=[U(), A()], system="s"),
        PreferenceRecord(prompt=[U()], responses=[A("1"), A("2")], strength="slightly_better"),
    ]
    out = tmp_path / "deep" / "dir" / "x.jsonl"
    assert write_jsonl(out, recs[:1]) == 1
    assert read_jsonl(out, "sft") == recs[:1]
    write_jsonl(out, recs[1:])  # overwrite atomically, no tmp file left behind
    assert read_jsonl(out, "preference") == recs[1:]
    assert [f.name for f in out.parent.iterdir()] == ["x.jsonl"]
    store = tmp_path / "store" / "s.jsonl"
    append_jsonl(store, sample)
    append_jsonl(store, sample.model_dump())
    assert read_jsonl(store, "scored") == [sample, sample]


def test_limit_and_strengths(tmp_path):
    rows = [{"prompt": [U()], "chosen": [A()], "rejected": [A("b")], "strength": s} for s in STRENGTHS]
    p = write_rows(tmp_path / "p.jsonl", *rows)
    assert STRENGTHS[0] == "significantly_better" and len(STRENGTHS) == 4
    assert [r.strength for r in read_jsonl(p, "preference")] == list(STRENGTHS)
    assert len(read_jsonl(p, "preference", limit=2)) == 2


# ---------------------------------------------------------------- bad rows

GOOD = {
    "sft": {"messages": [U(), A()]},
    "preference": {"prompt": [U()], "chosen": [A()], "rejected": [A("b")]},
    "prompt": {"prompt": [U()]},
    "scored": {"prompt": [U()], "response": A(), "score": 1.0},
}
BAD = [
    # kind, row, field, words in the reason
    ("sft", {"messages": [U(), A(" ")]}, "messages.1.content", "non-empty"),
    ("sft", {"messages": [U(), A()], "foo": 1}, "foo", "unknown field"),
    ("sft", {"source": "x"}, "messages", "missing field"),
    ("sft", {"messages": [{"role": "bot", "content": "x"}, A()]}, "messages.0.role", "'bot'"),
    ("sft", {"messages": [U(), U(), A()]}, "messages.1.role", "expected an 'assistant'"),
    ("sft", {"messages": [U(), A(), S()]}, "messages.2.role", "system message"),
    ("sft", {"messages": [U()]}, "messages", "end with an assistant"),
    ("sft", {"messages": [S(), U(), A()], "system": "x"}, "system", "already start"),
    ("sft", {"messages": [U(), "hi"]}, "messages.1", "expected an object, got string"),
    ("sft", {"prompt": [U()], "completion": [A("")]}, "completion.0.content", "non-empty"),
    ("sft", {"prompt": [U()], "completion": [U("x")]}, "completion.0.role", "'assistant'"),
    ("sft", {"prompt": [U()]}, "completion", "missing field"),
    ("preference", {"prompt": [U()], "chosen": [A("")], "rejected": [A()]}, "chosen.0.content", "non-empty"),
    (
        "preference",
        {"prompt": [U()], "chosen": [A()], "rejected": [A("")]},
        "rejected.0.content",
        "non-empty",
    ),
    ("preference", {"prompt": [U()], "chosen": [U("x")], "rejected": [A()]}, "chosen.0.role", "'user'"),
    ("preference", {"prompt": [U()], "chosen": [A(), A()], "rejected": [A()]}, "chosen", "exactly one"),
    ("preference", {"prompt": [U()], "chosen": [A()]}, "rejected", "missing field"),
    (
        "preference",
        {"prompt": [U()], "chosen": [A()], "rejected": [A()], "strength": "huge"},
        "strength",
        "'huge'",
    ),
    ("preference", {"prompt": [U()], "responses": [A()]}, "responses", "at least 2"),
    (
        "preference",
        {"prompt": [U()], "responses": [[A()], [A()], [A("")]]},
        "responses.2.0.content",
        "non-empty",
    ),
    ("preference", {"prompt": [U()], "responses": [[A()], []]}, "responses.1", "exactly one"),
    ("preference", {"prompt": [U(), A()], "chosen": [A()], "rejected": [A()]}, "prompt", "end with a user"),
    ("preference", {"prompt": [], "chosen": [A()], "rejected": [A()]}, "prompt", "at least one"),
    ("preference", {"responses": [A(), A()]}, "prompt", "missing field"),
    ("preference", {"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "non-empty"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": " \n "}, "rejected", "non-empty"),
    ("preference", {"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt", "non-empty"),
    ("preference", {"chosen": [U(), A("x")], "rejected": [U(), A("")]}, "rejected.1.content", "non-empty"),
    ("preference", {"chosen": [U(), A(), A("x")], "rejected": [U(), A(), A("y")]}, "chosen", "user turn"),
    ("preference", {"chosen": [U("a"), A()], "rejected": [U("b"), A()]}, "prompt", "missing field"),
    ("preference", {"prompt": [U()], "chosen": [A()], "rejected": [A()], "margin": "x"}, "margin", "number"),
    ("preference", {"prompt": [U()], "chosen": [A()], "rejected": [A()], "bogus": 1}, "bogus", "unknown"),
    ("prompt", {"prompt": [U(), A()]}, "prompt", "end with a user"),
    ("prompt", {"prompt": [U()], "tags": "safety"}, "tags", "expected a list"),
    ("prompt", {"messages": [U(""), A()]}, "messages.0.content", "non-empty"),
    ("scored", {"prompt": [U()], "response": U(), "score": 1.0}, "response.role", "'assistant'"),
    ("scored", {"prompt": [U()], "response": A(), "score": "high"}, "score", "expected a number"),
    ("scored", {"prompt": [U()], "response": A("  "), "score": 1.0}, "response.content", "non-empty"),
]


@pytest.mark.parametrize("kind,row,field,words", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_rows(tmp_path, kind, row, field, words):
    p = write_rows(tmp_path / "bad.jsonl", GOOD[kind], "  ", row, GOOD[kind])
    with pytest.raises(DataError) as ei:
        read_jsonl(p, kind)
    e = ei.value
    assert (e.path, e.line, e.field) == (str(p), 3, field)
    assert str(e) == f"{p}:3: field '{field}': {e.reason}"
    assert words in e.reason
    assert "pydantic" not in str(e) and "type=" not in str(e) and "\n" not in str(e)
    assert e.__cause__ is None and e.__suppress_context__
    recs = read_jsonl(p, kind, skip_bad=True)
    assert len(recs) == 2 and recs.skipped == 1 and [x.line for x in recs.errors] == [3]


def test_several_errors_reported_once():
    with pytest.raises(DataError) as ei:
        parse_record({"prompt": [U()], "chosen": [A("")], "rejected": [A()], "strength": "x"}, "preference")
    assert ei.value.field == "chosen.0.content" and ei.value.reason.endswith("(+1 more)")
    assert str(ei.value).startswith("field 'chosen.0.content': ")


def test_invalid_json_and_non_object(tmp_path):
    p = write_rows(tmp_path / "j.jsonl", GOOD["sft"], '{"messages": [', "[1, 2]")
    with pytest.raises(DataError) as ei:
        read_jsonl(p, "sft")
    assert ei.value.field is None and str(ei.value).startswith(f"{p}:2: invalid JSON: ")
    recs = read_jsonl(p, "sft", skip_bad=True)
    assert len(recs) == 1 and recs.skipped == 2
    assert str(recs.errors[1]) == f"{p}:3: expected a JSON object, got array"


def test_missing_file_and_error_object(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as ei:
        read_jsonl(p, "sft")
    assert str(ei.value) == f"{p}: file not found" and ei.value.line is None
    e = pickle.loads(pickle.dumps(DataError("bad", path="f", line=2, field="a.b")))
    assert str(e) == "f:2: field 'a.b': bad" and isinstance(e, ValueError)
    with pytest.raises(ValueError, match="unknown record kind"):
        read_jsonl(p, "nonsense")


def test_skip_bad_keeps_first_20_errors(tmp_path):
    p = write_rows(tmp_path / "many.jsonl", *([{"messages": []}] * 25), GOOD["sft"])
    recs = read_jsonl(p, "sft", skip_bad=True)
    assert len(recs) == 1 and recs.skipped == 25 and len(recs.errors) == 20


def test_models_directly():
    assert Message(role="user", content=" x ").content == " x "
    with pytest.raises(ValueError):
        PreferenceRecord(prompt=[U()], responses=[A(), U()])
    with pytest.raises(ValueError):
        SFTRecord(messages=[S()])


# ---------------------------------------------------------------- real shared data

SHARED_FILES = [
    ("sft.train.jsonl", "sft"),
    ("multiturn.train.jsonl", "sft"),
    ("prefs_helpful.train.jsonl", "preference"),
    ("prefs_human.train.jsonl", "preference"),
    ("prefs_safety.train.jsonl", "preference"),
    ("prefs_ranked.train.jsonl", "preference"),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("name,kind", SHARED_FILES)
def test_shared_data_loads(name, kind):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    recs = read_jsonl(path, kind, limit=200)  # strict: every row must be valid
    assert len(recs) == 200 and recs.skipped == 0
    assert len(read_jsonl(path, "prompt", limit=200)) == 200  # every file doubles as a prompt pool
    if name.startswith("multiturn"):
        assert all(sum(m.role == "user" for m in r.messages) >= 3 for r in recs)
    if kind == "preference":
        n_resp = Counter(len(r.responses) for r in recs)
        assert n_resp == Counter({3 if "ranked" in name else 2: 200})
        strengths = {r.strength for r in recs}
        if "helpful" in name:  # graded; the first rows are all one level, so check the whole file
            assert None not in strengths
            assert {r.strength for r in read_jsonl(path, kind)} == set(STRENGTHS)
        elif "human" in name or "safety" in name:
            assert strengths == {None}
