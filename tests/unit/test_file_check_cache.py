"""Validation reads a data file once per kind while it is unchanged (a recipe names one file in many stages),
and sees a rewritten file at once."""

import json

from align.config import file_checks


def test_one_read_per_unchanged_file_and_a_rewrite_is_seen(tmp_path, monkeypatch):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    reads = []
    real = file_checks.read_jsonl
    monkeypatch.setattr(file_checks, "read_jsonl", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert file_checks.check_data_file("stages[a].data.paths[0]", str(path), "sft", False) == []
    assert file_checks.check_data_file("stages[b].data.paths[0]", str(path), "sft", False) == []
    assert len(reads) == 1
    path.write_text(path.read_text() + "{not json\n")
    [problem] = file_checks.check_data_file("stages[c].data.paths[0]", str(path), "sft", False)
    assert problem.startswith("stages[c].data.paths[0]: ") and ":2: invalid JSON" in problem
    assert len(reads) == 2
