"""A resumed stage logs its held-out numbers before training once: the row of the first start is replaced,
not repeated (DPO's ``start/`` row), and the training rows continue where the checkpoint left them."""

from __future__ import annotations

import json

import pytest

import align.train.loop as loop
from align.config.recipe import recipe_from_dict
from align.runner import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def test_a_resumed_dpo_logs_its_start_row_once(tmp_path, monkeypatch):
    stage = {"name": "dpo", "kind": "dpo", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"builtin": "chat", "builtin_size": 24, "eval_fraction": 0.2},
             "train": {"batch_size": 4, "max_steps": 4, "save_every": 2, "report_to": []}}
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [stage]})
    real, calls = loop.optimizer_step, []

    def killed_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_stage(recipe, "dpo", 1, "fp")
    monkeypatch.setattr(loop, "optimizer_step", real)
    run_stage(recipe, "dpo", 1, "fp")
    rows = [json.loads(x) for x in (tmp_path / "runs/t/round_1/dpo/metrics.jsonl").read_text().splitlines()]
    assert sum(any(k.startswith("start/") for k in r) for r in rows) == 1
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
