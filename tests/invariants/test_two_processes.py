"""Two processes (torchrun, gloo on CPU) train exactly like one process with twice the gradient
accumulation: same loss at every step, same final weights. Through the real CLI (``align run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_in_one_process

pytestmark = pytest.mark.slow

STEPS = 4


def recipe(num_processes: int, grad_accum: int) -> dict:
    return {
        "name": "two_proc",
        "seed": 0,
        "stages": [
            {
                "name": "sft",
                "kind": "sft",
                "launch": {"num_processes": num_processes},
                "model": {
                    "path": "builtin:tiny",
                    "tiny": {
                        "hidden_size": 32,
                        "intermediate_size": 64,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 2,
                    },
                },
                "data": {"builtin": "chat", "builtin_size": 64, "eval_fraction": 0.1},
                "train": {
                    "max_steps": STEPS,
                    "batch_size": 4,
                    "grad_accum": grad_accum,
                    "max_length": 64,
                    "report_to": [],
                    "optim": {"lr": 1.0e-3, "warmup_ratio": 0.0},
                },
            }
        ],
    }


def child_env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"}
        and not k.startswith("PET_")
    }
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_align(tmp_path: Path, label: str, data: dict) -> Path:
    if data["stages"][0]["launch"]["num_processes"] == 1:
        run_in_one_process(data, tmp_path / label)
        return tmp_path / label / data["name"] / "round_1" / "sft"
    recipe_file = tmp_path / f"{label}.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    out = tmp_path / label
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(recipe_file), "--output-dir", str(out)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"align run ({label}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out / data["name"] / "round_1" / "sft"


def train_losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (stage_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    # one row per step: every process writing its own rows (no process group) would duplicate them
    assert steps == list(range(1, STEPS + 1)), steps
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_processes_match_one_process_with_double_accumulation(tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    two = run_align(tmp_path, "two_procs", recipe(num_processes=2, grad_accum=1))
    one = run_align(tmp_path, "one_proc", recipe(num_processes=1, grad_accum=2))

    losses_two, losses_one = train_losses(two), train_losses(one)
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert losses_one[STEPS] < losses_one[1]  # it trained

    result_two = json.loads((two / "result.json").read_text())["metrics"]
    result_one = json.loads((one / "result.json").read_text())["metrics"]
    assert result_two["train_tokens"] == result_one["train_tokens"]  # both ranks' tokens were counted
    assert result_two["eval_loss"] == pytest.approx(result_one["eval_loss"], rel=1e-4)

    from safetensors.torch import load_file

    weights_two = load_file(two / "model" / "model.safetensors")
    weights_one = load_file(one / "model" / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name, w in weights_one.items():
        torch.testing.assert_close(weights_two[name], w, rtol=1e-4, atol=1e-6, msg=name)
