"""Line stores and small state files survive a kill: a record cut short spoils only itself, the next one
starts on a fresh line, and whole-file writes are atomic."""

from __future__ import annotations

import json

import pytest

from align.io_atomic import append_line, read_json_lines, write_text_atomic
from align.train.metrics import MetricsLogger, read_metrics
from data_schemas import append_jsonl


def test_append_after_a_line_cut_short_starts_a_fresh_line(tmp_path):
    store = tmp_path / "s.jsonl"
    append_line(store, json.dumps({"a": 1}))
    with open(store, "ab") as f:
        f.write(b'{"a": 2, "b')  # killed mid-write
    append_line(store, json.dumps({"a": 3}))
    got = list(read_json_lines(store))
    assert [(n, row) for n, row, bad in got if bad is None] == [(1, {"a": 1}), (3, {"a": 3})]
    ((n, row, bad),) = [g for g in got if g[2] is not None]
    assert n == 2 and row is None and "damaged" in bad  # no longer the last line: damage
    with open(store, "ab") as f:
        f.write(b'{"a": 4')
    assert "cut short" in list(read_json_lines(store))[-1][2]
    with pytest.raises(ValueError):
        append_line(store, "two\nlines")


def test_append_jsonl_starts_a_fresh_line(tmp_path):
    store = tmp_path / "s.jsonl"
    append_jsonl(store, {"x": 1})
    with open(store, "ab") as f:
        f.write(b'{"x": ')
    append_jsonl(store, {"x": 2})
    lines = store.read_bytes().split(b"\n")
    assert [json.loads(ln) for ln in (lines[0], lines[2])] == [{"x": 1}, {"x": 2}] and lines[1] == b'{"x": '


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_metrics_survive_a_line_cut_short(tmp_path):
    logger = MetricsLogger(tmp_path, [])
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 4, "train/lo')  # killed while logging step 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger.truncate_after(2)  # resumed at step 2
    logger.log(3, {"loss": 0.25})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert all(bad is None for _, _, bad in read_json_lines(path))
