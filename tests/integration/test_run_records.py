"""scripts/run_records.py: a run's records (no models) outlive its folder; put back, the runner skips the
stages they record, and a stage whose record is removed runs again while its finished downstream stays."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from align.config.recipe import recipe_from_dict
from align.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scripts_run_records", REPO / "scripts" / "run_records.py")
run_records = importlib.util.module_from_spec(_spec)
sys.modules["scripts_run_records"] = run_records
_spec.loader.exec_module(run_records)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def _recipe(root: Path):
    return recipe_from_dict({"name": "r", "seed": 0, "output_dir": str(root), "stages": [
        {"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
         "data": {"builtin": "world", "builtin_size": 16},
         "train": {"batch_size": 4, "max_steps": 1, "max_length": 64, "report_to": []}},
        {"name": "eval_sft", "kind": "evaluate", "model": {"from": "sft"},
         "prompts": {"builtin": "world", "builtin_size": 4},
         "sampling": {"temperature": 0.0, "max_new_tokens": 4, "batch_size": 4}}]})


def test_records_skip_their_stages_and_a_removed_record_reruns(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "records"
    first = {r["stage"]: r for r in run_recipe(_recipe(runs), log=lambda *_: None)}
    run_records.main([str(runs / "r"), "--into", str(kept)])
    copied = sorted(str(p.relative_to(kept / "r")) for p in (kept / "r").rglob("*") if p.is_file())
    assert "round_1/sft/result.json" in copied and "resolved.yaml" in copied
    assert not any("model" in p or "answers" in p or p.endswith(".safetensors") for p in copied)
    row = json.loads((kept / "r" / "records.jsonl").read_text().splitlines()[-1])
    assert row["stages"] == ["round_1/eval_sft", "round_1/sft"] and row["cpu"]

    shutil.rmtree(runs)  # the machine is gone; its records are put back
    shutil.copytree(kept / "r", runs / "r")
    again = {r["stage"]: r for r in run_recipe(_recipe(runs), log=lambda *_: None)}
    assert again["sft"]["skipped"] and again["eval_sft"]["skipped"]
    assert again["eval_sft"]["metrics"] == first["eval_sft"]["metrics"]

    shutil.rmtree(runs / "r" / "round_1" / "sft")  # its model is needed again: its record goes
    third = {r["stage"]: r for r in run_recipe(_recipe(runs), log=lambda *_: None)}
    assert not third["sft"]["skipped"] and third["eval_sft"]["skipped"]  # the same fingerprint downstream
    assert (runs / "r" / "round_1" / "sft" / "model").is_dir()
