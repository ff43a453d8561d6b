"""Policy snapshots along a run (``train.snapshot_every``) and their evaluation (evaluate's ``snapshots``):
the snapshot after step N holds the weights a run of N steps ends with; the evaluation writes one row per
snapshot and one for the final policy, with the gold metrics and the KL to the reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from align.config.recipe import recipe_from_dict
from align.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
TRAIN = {"batch_size": 4, "report_to": [], "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "min_lr_ratio": 1.0}}  # constant lr


def dpo(steps: int, snapshot_every: int = 0) -> dict:
    return {"name": "dpo", "kind": "dpo", "model": {"path": "builtin:tiny", "tiny": TINY},
            "data": {"builtin": "chat", "builtin_size": 16},
            "train": {**TRAIN, "max_length": 80, "max_steps": steps, "snapshot_every": snapshot_every}}


def ppo(iterations: int, snapshot_every: int = 0) -> dict:
    return {"name": "ppo", "kind": "ppo", "model": {"path": "builtin:tiny", "tiny": TINY},
            "prompts": {"builtin": "world", "builtin_size": 32}, "reward": {"function": "gold"},
            "sampling": {"temperature": 1.0, "max_new_tokens": 8, "batch_size": 8},
            "iterations": iterations, "rollout_batch_size": 8, "ppo_epochs": 1,
            "train": {**TRAIN, "snapshot_every": snapshot_every}}


def evaluate(of: str) -> dict:
    return {"name": "eval", "kind": "evaluate", "model": {"from": of}, "reference": {"path": "builtin:tiny", "tiny": TINY},
            "prompts": {"builtin": "world_eval", "builtin_size": 12},
            "sampling": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 12}, "snapshots": True}


def run(tmp_path, name, stages):
    recipe = recipe_from_dict({"name": name, "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": stages})
    records = run_recipe(recipe, log=lambda *_: None)
    return {r["stage"]: r for r in records}, tmp_path / "runs" / name / "round_1"


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", ["dpo", "ppo"])
def test_snapshots_hold_the_weights_of_shorter_runs_and_are_evaluated(tmp_path, kind):
    make = dpo if kind == "dpo" else ppo
    records, stages = run(tmp_path, "long", [make(3, snapshot_every=1), evaluate(kind)])
    snaps = stages / kind / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step_1", "step_2"]  # the last step is model/
    _, short = run(tmp_path, "short", [make(2)])
    # the snapshot after step 2 is what a 2-step run ends with (same seed, same data order)
    for name, w in weights(short / kind / "model").items():
        torch.testing.assert_close(weights(snaps / "step_2")[name], w, rtol=1e-5, atol=1e-7, msg=name)
    # ... and not the final policy, nor the snapshot before it
    final, first = weights(stages / kind / "model"), weights(snaps / "step_1")
    assert any(not torch.equal(final[n], w) for n, w in weights(snaps / "step_2").items())
    assert any(not torch.equal(first[n], w) for n, w in weights(snaps / "step_2").items())
    # the evaluation: a row per snapshot, then the final policy's (the same numbers as the stage's metrics)
    rows = [json.loads(x) for x in (stages / "eval" / "snapshots.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    metrics = records["eval"]["metrics"]
    assert metrics["snapshots"] == 2.0
    assert rows[-1]["gold_score"] == metrics["gold_score"]
    assert rows[-1]["kl_to_reference"] == metrics["kl_to_reference"]
    for r in rows:
        assert {"gold_helpfulness", "safety_violation_rate", "kl_to_reference"} <= set(r)
    assert len({r["kl_to_reference"] for r in rows}) == 3  # each snapshot measured on its own


def test_a_reward_model_has_no_snapshots():
    from align.config.recipe import RecipeError

    stage = {"name": "rm", "kind": "reward_model", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"builtin": "chat"}, "train": {"snapshot_every": 2}}
    with pytest.raises(RecipeError, match="snapshot_every"):
        recipe_from_dict({"name": "t", "stages": [stage]})
