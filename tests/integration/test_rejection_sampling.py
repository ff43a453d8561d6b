"""Rejection sampling: best-of-K, resume without regenerating, same records under two processes,
pools across rounds."""

import json
import os
import subprocess
import sys

import pytest
import yaml

import align.stages.rejection_sampling as rs
from align.config.base import Artifact
from align.config.recipe import recipe_from_dict
from align.runner import run_recipe, run_stage
from tests.conftest import run_in_one_process

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def recipe(tmp_path, rounds=1, **stage):
    rs_stage = {
        "name": "rs", "kind": "rejection_sampling",
        "model": {"path": "builtin:tiny", "tiny": TINY},
        "prompts": {"builtin": "world", "builtin_size": 12},
        "reward": {"function": "gold"},
        "k": 4,
        "sampling": {"temperature": 1.0, "max_new_tokens": 12, "batch_size": 3, "seed": 1},
        "evaluators": ["world"],
        **stage,
    }
    return {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "rounds": rounds, "stages": [rs_stage]}


def rows(path):
    return [json.loads(x) for x in open(path)]


def test_best_of_k_keeps_the_highest_score(tmp_path):
    (record,) = run_recipe(recipe_from_dict(recipe(tmp_path)), log=lambda *_: None)
    samples = rows(record["artifacts"]["samples"])
    sft = rows(record["artifacts"]["sft_records"])
    by_prompt: dict[str, list] = {}
    for s in samples:  # ScoredSample rows: one per (prompt, candidate)
        by_prompt.setdefault(json.dumps(s["prompt"]), []).append(s)
    assert len(by_prompt) == 12 and len(sft) == 12
    for r in sft:
        cands = by_prompt[json.dumps(r["messages"][:-1])]
        best = max(cands, key=lambda c: c["score"])
        assert r["meta"]["score"] == best["score"]
        assert r["messages"][-1]["content"] == best["response"]["content"]
        assert r["meta"]["k"] == 4 and r["meta"]["round"] == 1 and r["meta"]["temperature"] == 1.0
    m = record["metrics"]
    assert m["reward_best_mean"] >= m["reward_sample_mean"]
    assert m["gold_best_mean"] == pytest.approx(m["reward_best_mean"])  # the gold judge is the reward here
    for p in rows(record["artifacts"]["preferences"]):
        assert p["meta"]["scores"][0] > p["meta"]["scores"][1]


def test_drop_unfinished_keeps_only_answers_that_ended(tmp_path):
    # 6 new tokens: the untrained tiny model ends few answers within them
    stage = {"sampling": {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 3, "seed": 1}}
    (kept,) = run_recipe(recipe_from_dict(recipe(tmp_path / "keep", **stage)), log=lambda *_: None)
    (dropped,) = run_recipe(recipe_from_dict(recipe(tmp_path / "drop", drop_unfinished=True, **stage)),
                            log=lambda *_: None)
    samples = rows(kept["artifacts"]["samples"])
    unfinished = [s for s in samples if not s["meta"]["finished"]]
    assert unfinished and len(unfinished) < len(samples)  # both kinds exist (else the test shows nothing)
    m = dropped["metrics"]
    assert m["unfinished_dropped"] == kept["metrics"]["length_stop_rate"] * 48
    finished = {(json.dumps(s["prompt"]), s["response"]["content"]) for s in samples if s["meta"]["finished"]}
    sft = rows(dropped["artifacts"]["sft_records"])
    assert sft and len(sft) == 12 - m["prompts_without_finished"]
    for r in sft:  # every kept answer is one that ended
        assert (json.dumps(r["messages"][:-1]), r["messages"][-1]["content"]) in finished
    assert all(s["meta"]["finished"] for s in rows(dropped["artifacts"]["samples"]))
    assert kept["metrics"]["unfinished_dropped"] == 0 and len(rows(kept["artifacts"]["sft_records"])) == 12


def test_resume_after_kill_regenerates_nothing_stored(tmp_path, monkeypatch):
    calls = []
    real = rs.make_generator

    def counting(*args, **kwargs):
        gen = real(*args, **kwargs)
        inner = gen.sample

        def sample(prompts, k, params):
            calls.append(len(prompts))
            if len(calls) == 3 and not os.environ.get("RESUMED"):
                raise KeyboardInterrupt  # killed while generating batch 3
            return inner(prompts, k, params)

        gen.sample = sample
        return gen

    monkeypatch.setattr(rs, "make_generator", counting)
    # in this process (the runner would start a fresh one, without the patch)
    data = recipe_from_dict(recipe(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_stage(data, "rs", 1, "fp")
    assert len(calls) == 3  # 2 batches stored, the 3rd interrupted
    monkeypatch.setenv("RESUMED", "1")
    calls.clear()
    result = run_stage(data, "rs", 1, "fp")
    assert len(calls) == 2  # 4 batches of 3 prompts, 2 of them already stored
    assert result.metrics["samples"] == 12 * 4

    # the same records as a run that was never interrupted
    calls.clear()
    ref = run_stage(recipe_from_dict(recipe(tmp_path / "clean")), "rs", 1, "fp")
    assert len(calls) == 4
    assert rows(ref.artifacts[Artifact.SFT_RECORDS]) == rows(result.artifacts[Artifact.SFT_RECORDS])


@pytest.mark.slow
def test_two_processes_write_the_same_records_as_one(tmp_path):
    outputs = []
    for n in (1, 2):
        data = recipe(tmp_path / f"p{n}", launch={"num_processes": n})
        path = tmp_path / f"p{n}.yaml"
        path.write_text(yaml.safe_dump(data))
        if n == 1:
            run_in_one_process(data, tmp_path / f"p{n}" / "runs")
        else:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, "-m", "align.cli", "run", str(path)], check=True, env=env,
                           capture_output=True, timeout=300)
        out = tmp_path / f"p{n}" / "runs/t/round_1/rs"
        outputs.append((rows(out / "sft.jsonl"), rows(out / "pairs.jsonl")))
        if n == 2:
            assert len(list(out.glob("store.rank*.jsonl"))) == 2  # both processes generated
    assert outputs[0] == outputs[1]


def test_pool_over_previous_rounds_never_keeps_a_worse_answer(tmp_path):
    from data_schemas import write_jsonl
    from world.generator import prompt_records

    write_jsonl(tmp_path / "prompts.jsonl", prompt_records(12, 0))  # the same prompts in both rounds
    data = recipe(tmp_path, rounds=2, pool_previous_rounds=True,
                  prompts={"paths": [str(tmp_path / "prompts.jsonl")]})
    records = run_recipe(recipe_from_dict(data), log=lambda *_: None)
    r1, r2 = (rows(r["artifacts"]["sft_records"]) for r in records)
    best1 = {json.dumps(r["messages"][:-1]): r["meta"]["score"] for r in r1}
    assert {json.dumps(r["messages"][:-1]) for r in r2} >= set(best1)
    for r in r2:
        key = json.dumps(r["messages"][:-1])
        if key in best1:
            assert r["meta"]["score"] >= best1[key]
    assert records[1]["metrics"]["reward_best_mean"] >= records[0]["metrics"]["reward_best_mean"]


@pytest.mark.parametrize("where", ["last line cut short", "middle line damaged"])
def test_a_record_cut_short_or_damaged_is_generated_again(tmp_path, monkeypatch, where):
    ref = run_stage(recipe_from_dict(recipe(tmp_path / "clean")), "rs", 1, "fp")
    data = recipe_from_dict(recipe(tmp_path))
    run_stage(data, "rs", 1, "fp")
    store = tmp_path / "runs/t/round_1/rs/store.rank0.jsonl"
    lines = store.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4  # 12 prompts in batches of 3
    if where == "last line cut short":  # killed while appending batch 3's record
        bad_line = 4
        store.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    else:
        bad_line = 2
        store.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2] + b"\n" + b"".join(lines[2:]))
    calls = []
    real = rs.make_generator

    def counting(*args, **kwargs):
        gen = real(*args, **kwargs)
        inner = gen.sample

        def sample(prompts, k, params):
            calls.append(len(prompts))
            return inner(prompts, k, params)

        gen.sample = sample
        return gen

    monkeypatch.setattr(rs, "make_generator", counting)
    with pytest.warns(UserWarning, match=rf"store\.rank0\.jsonl:{bad_line}: store record") as caught:
        result = run_stage(data, "rs", 1, "fp")
    assert len([w for w in caught if "store record" in str(w.message)]) == 1
    assert calls == [3]  # that batch only
    assert result.metrics["samples"] == 12 * 4 and result.metrics["prompts"] == 12
    assert rows(ref.artifacts[Artifact.SFT_RECORDS]) == rows(result.artifacts[Artifact.SFT_RECORDS])
    assert rows(ref.artifacts[Artifact.SAMPLES]) == rows(result.artifacts[Artifact.SAMPLES])
    # the new record is on a line of its own; every batch reads back
    assert sorted(rs.read_store(store.parent, warn=False)) == [0, 1, 2, 3]


def test_a_batch_missing_after_generation_fails_the_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "append_line", lambda path, line: None)  # records that never reach the store
    with pytest.raises(RuntimeError, match=r"batches \[0, 1, 2, 3\] missing from the store"):
        run_stage(recipe_from_dict(recipe(tmp_path)), "rs", 1, "fp")
