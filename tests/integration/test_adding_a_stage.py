"""The example stage of docs/adding-a-stage.md, run as written: a few CPU steps on a tiny model lower its
loss, change the weights and save an HF checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from align import runner
from align.config.recipe import recipe_from_dict
from align.runner import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "adding-a-stage.md"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def test_the_guides_example_stage_trains(tmp_path, monkeypatch):
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S) if "class ChosenNLL" in c]
    example: dict = {}
    exec(compile(code, str(GUIDE), "exec"), example)
    # the example reuses the DPO stage's config (model, preference data, train settings) under its own run
    monkeypatch.setattr(runner, "stage_module", lambda kind: SimpleNamespace(run=example["run"]))
    stage = {"name": "chosen", "kind": "dpo", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"builtin": "chat", "builtin_size": 32},
             "train": {"batch_size": 4, "max_steps": 8, "report_to": [], "optim": {"lr": 1e-2, "warmup_ratio": 0.0}}}
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [stage]})
    metrics = run_stage(recipe, "chosen", 1, "fp").metrics
    assert metrics["steps"] == 8 and metrics["train_loss_last"] < metrics["train_loss_first"]
    model = tmp_path / "runs/t/round_1/chosen/model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
