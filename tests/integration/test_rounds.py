"""Rounds, cross-round references, and skipping: a rerun redoes only what changed and what depends on it."""

import copy
import json

import pytest

from align.config.recipe import RecipeError, recipe_from_dict
from align.runner import run_recipe
from tests.conftest import tiny_sft_recipe


def _recipe(tmp_path, rounds=1):
    data = tiny_sft_recipe(tmp_path, max_steps=2)
    a = data["stages"][0]
    a["name"] = "a"
    a["model"]["from"] = "prev.b"  # round k starts from round k-1's final model; round 1 from builtin:tiny
    b = copy.deepcopy(a)
    b.update(name="b", model={"from": "a"})
    c = copy.deepcopy(a)
    c.update(name="c", model={"path": "builtin:tiny", "tiny": a["model"]["tiny"]})
    data["stages"] = [a, b, c]
    data["rounds"] = rounds
    return data


def _run(data, overrides=()):
    logs = []
    records = run_recipe(recipe_from_dict(copy.deepcopy(data), list(overrides)), log=logs.append)
    ran = [(r["round"], r["stage"]) for r in records if not r["skipped"]]
    return records, ran, logs


def test_rerun_skips_everything_and_says_so(tmp_path):
    data = _recipe(tmp_path)
    _, ran, _ = _run(data)
    assert ran == [(1, "a"), (1, "b"), (1, "c")]
    _, ran, logs = _run(data)
    assert ran == []
    assert "nothing to do: every stage is up to date" in logs


def test_changed_setting_reruns_that_stage_and_dependents_only(tmp_path):
    data = _recipe(tmp_path)
    _run(data)
    _, ran, _ = _run(data, ["c.train.optim.lr=1e-3"])
    assert ran == [(1, "c")]
    _, ran, _ = _run(data, ["c.train.optim.lr=1e-3", "a.train.optim.lr=1e-3"])
    assert ran == [(1, "a"), (1, "b")]


def test_round_two_starts_from_previous_rounds_model(tmp_path):
    records, ran, _ = _run(_recipe(tmp_path, rounds=2))
    assert ran == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]
    by = {(r["round"], r["stage"]): r for r in records}
    rows = [json.loads(x) for x in (tmp_path / "runs/t/round_2/a/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == by[(2, "a")]["metrics"]["steps"]  # trained
    # round 2's a starts where round 1's b ended: its first loss is far below round 1's from-scratch loss
    assert by[(2, "a")]["metrics"]["train_loss_first"] < by[(1, "a")]["metrics"]["train_loss_first"] - 0.1
    # c does not depend on anything, but each round reruns it with that round's seed
    assert by[(2, "c")]["artifacts"]["policy"].endswith("round_2/c/model")


def test_previous_round_reference_needs_a_round_one_fallback(tmp_path):
    data = _recipe(tmp_path)
    del data["stages"][0]["model"]["path"]
    with pytest.raises(RecipeError, match="round 1 does not have"):
        recipe_from_dict(data)
    data = _recipe(tmp_path)
    data["stages"][0]["model"]["from"] = "prev.bb"
    with pytest.raises(RecipeError, match="did you mean 'prev.b'|did you mean 'b'"):
        recipe_from_dict(data)


def test_stage_limited_to_round_one_is_read_by_later_rounds(tmp_path):
    data = _recipe(tmp_path, rounds=2)
    data["stages"] = data["stages"][:2]
    a, b = data["stages"]
    a["in_rounds"] = [1]
    a["model"] = {"path": "builtin:tiny", "tiny": a["model"]["tiny"]}
    b["model"] = {"from": ["prev.b", "a"]}
    records, ran, _ = _run(data)
    assert ran == [(1, "a"), (1, "b"), (2, "b")]
    with pytest.raises(RecipeError, match="outside 1..2"):
        recipe_from_dict({**data, "stages": [{**a, "in_rounds": [3]}, b]})
