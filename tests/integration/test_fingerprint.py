"""The stage fingerprint covers the content of its input files: rerunning a recipe after changing an
input JSONL file's content (same path) reruns the stage; rewriting the same content (a new mtime)
does not. Through ``run_recipe`` and the run's ``report.json`` / ``result.json`` only."""

import json
import os

import pytest

from align.config.recipe import recipe_from_dict
from align.runner import run_recipe

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # 4 stage runs, each in its own process: ~10 s

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


ROWS = [chat("Say hi.", "Hi."), chat("Say yes.", "Yes."), chat("Say no.", "No.")]


def run(tmp_path, data):
    stage = {"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"paths": [str(data)]},
             "train": {"batch_size": 3, "max_length": 64, "max_steps": 1, "report_to": [],
                       "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}}
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": [stage]})
    run_recipe(recipe, log=lambda *_: None)
    (report,) = json.loads((tmp_path / "runs/t/report.json").read_text())
    result = json.loads((tmp_path / "runs/t/round_1/sft/result.json").read_text())
    return report, result


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_changed_file_content_reruns_the_stage_same_content_skips(tmp_path):
    data = tmp_path / "sft.jsonl"
    write(data, ROWS)
    first, result1 = run(tmp_path, data)
    assert first["skipped"] is False

    write(data, ROWS)  # same bytes, new mtime
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again, result2 = run(tmp_path, data)
    assert again["skipped"] is True
    assert result2["fingerprint"] == result1["fingerprint"]

    write(data, [*ROWS[:2], chat("Say no.", "Nope.")])  # same path, one answer changed
    changed, result3 = run(tmp_path, data)
    assert changed["skipped"] is False
    assert result3["fingerprint"] != result1["fingerprint"]
    # the rerun trained on the new content: its first loss differs from the first run's
    assert changed["metrics"]["train_loss_first"] != pytest.approx(first["metrics"]["train_loss_first"], abs=1e-6)

    before = data.stat().st_size
    write(data, [*ROWS[:2], chat("Say no.", "Nopf.")])  # same size as the last file, other content
    assert data.stat().st_size == before
    rerun, _ = run(tmp_path, data)
    assert rerun["skipped"] is False
