"""PPO under two processes (torchrun, gloo on CPU) trains exactly like one process with twice the gradient
accumulation: each process rolls out half of every rollout batch, the advantages are whitened over both
halves, and the optimizer steps see the same rows. Same per-iteration metrics, same final weights of the
policy and the value model. Greedy rollouts, one prompt per generation batch, so both runs sample the same
responses; through the real CLI (``align run``), like the DPO / RM and SFT two-process tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_in_one_process
from tests.invariants.test_two_processes_dpo_rm import child_env

pytestmark = pytest.mark.slow

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
ITERATIONS = 2


def recipe(num_processes: int, grad_accum: int) -> dict:
    stage = {
        "name": "ppo", "kind": "ppo", "launch": {"num_processes": num_processes},
        "model": {"path": "builtin:tiny", "tiny": TINY},
        "prompts": {"builtin": "world", "builtin_size": 16},
        "reward": {"function": "gold"},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 1},
        "iterations": ITERATIONS, "rollout_batch_size": 8, "ppo_epochs": 2, "kl_coef": 0.05,
        "missing_eos_penalty": -1.0,  # scores that differ between rows, so the whitening matters
        "train": {"batch_size": 4, "grad_accum": grad_accum, "report_to": [],
                  "optim": {"lr": 1e-3, "warmup_ratio": 0.0}},
    }
    return {"name": "two_proc", "seed": 0, "stages": [stage]}


def run_align(tmp_path: Path, label: str, num_processes: int, grad_accum: int) -> Path:
    data = recipe(num_processes, grad_accum)
    out = tmp_path / label
    if num_processes == 1:
        run_in_one_process(data, out)
    else:
        recipe_file = tmp_path / f"{label}.yaml"
        recipe_file.write_text(yaml.safe_dump(data))
        proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(recipe_file), "--output-dir", str(out)],
                              cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"align run ({label}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out / "two_proc" / "round_1" / "ppo"


def iteration_rows(stage_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (stage_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))  # one row per iteration, not per process
    return rows


def test_ppo_two_processes_match_one_process_with_double_accumulation(tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    two = run_align(tmp_path, "two_procs", num_processes=2, grad_accum=1)
    one = run_align(tmp_path, "one_proc", num_processes=1, grad_accum=2)
    rows_two, rows_one = iteration_rows(two), iteration_rows(one)
    for r2, r1 in zip(rows_two, rows_one, strict=True):
        # every process's rollouts counted: scores, KL, lengths over the whole batch; the same losses
        for key in ("train/score", "train/kl", "train/kl_k3", "train/response_length", "train/no_eos_rate",
                    "train/loss", "train/pg_loss", "train/vf_loss", "train/optimizer_steps"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    assert rows_one[-1]["train/kl_k3"] > 0  # the second rollout came from a policy that had moved
    # AdamW divides each gradient by its own running RMS, so an element whose gradient is float noise
    # (~1e-9, e.g. an embedding entry of a rare token) moves by up to lr per step in a direction the noise
    # picks: a handful of such elements may differ. A real difference (a process's rows or tokens missing,
    # statistics of one process only) changes whole rows and the losses above.
    lr, steps = 1e-3, ITERATIONS * rows_one[-1]["train/optimizer_steps"]
    for folder in ("model", "value_model"):
        w_two, w_one = (load_file(str(d / folder / "model.safetensors")) for d in (two, one))
        assert w_two.keys() == w_one.keys()
        total = apart = 0
        for name, w in w_one.items():
            diff = (w_two[name] - w).abs()
            assert float(diff.max()) < lr * steps, f"{folder}: {name} differs by {float(diff.max())}"
            total, apart = total + diff.numel(), apart + int((diff > 1e-6).sum())
        assert apart <= 1e-3 * total, f"{folder}: {apart} of {total} weights differ by more than 1e-6"
