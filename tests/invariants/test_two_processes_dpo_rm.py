"""DPO and the reward model: two processes (torchrun, gloo on CPU) train exactly like one process with
twice the gradient accumulation: same loss at every step, same final weights. Through the real CLI
(``align run``), like tests/invariants/test_two_processes.py for SFT."""

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

STEPS = 3
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def stage(kind: str, num_processes: int, grad_accum: int) -> dict:
    train = {"max_steps": STEPS, "batch_size": 2, "grad_accum": grad_accum, "max_length": 96, "report_to": [],
             "optim": {"lr": 1.0e-3, "warmup_ratio": 0.0}}
    common = {"name": kind, "kind": kind, "launch": {"num_processes": num_processes},
              "model": {"path": "builtin:tiny", "tiny": TINY}, "train": train}
    if kind == "dpo":
        # adjacent pairs of 3 ranked answers; beta, NLL and label smoothing all on
        return {**common, "data": {"builtin": "chat", "builtin_size": 24}, "pairs": "adjacent", "beta": 0.5,
                "nll_weight": 0.2, "label_smoothing": 0.1, "metrics_records": 8}
    return {**common, "data": {"builtin": "chat", "builtin_size": 24, "eval_fraction": 0.2},
            "margin": {"better": 0.5}, "centering_coef": 0.01, "stats_records": 8}


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"}
           and not k.startswith("PET_")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_align(tmp_path: Path, label: str, kind: str, num_processes: int, grad_accum: int) -> Path:
    data = {"name": "two_proc", "seed": 0, "stages": [stage(kind, num_processes, grad_accum)]}
    recipe_file = tmp_path / f"{label}.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    out = tmp_path / label
    if num_processes == 1:
        run_in_one_process(data, out)
        return out / "two_proc" / "round_1" / kind
    proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(recipe_file), "--output-dir", str(out)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"align run ({label}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out / "two_proc" / "round_1" / kind


def train_losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (stage_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # one row per step, not one per process
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    result = json.loads((stage_dir / "result.json").read_text())
    (relative,) = result["artifacts"].values()  # relative to the run folder, two levels above the stage
    return load_file(stage_dir.parents[1] / relative / "model.safetensors")


@pytest.mark.parametrize("kind", ["dpo", "reward_model"])
def test_two_processes_match_one_process_with_double_accumulation(tmp_path, kind):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    two = run_align(tmp_path, "two_procs", kind, num_processes=2, grad_accum=1)
    one = run_align(tmp_path, "one_proc", kind, num_processes=1, grad_accum=2)
    losses_two, losses_one = train_losses(two), train_losses(one)
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert len(set(losses_one.values())) == STEPS  # the weights moved between steps
    m_two = json.loads((two / "result.json").read_text())["metrics"]
    m_one = json.loads((one / "result.json").read_text())["metrics"]
    assert m_two["train_tokens"] == m_one["train_tokens"]  # both ranks' tokens were counted
    w_two, w_one = weights(two), weights(one)
    assert w_two.keys() == w_one.keys()
    for name, w in w_one.items():
        torch.testing.assert_close(w_two[name], w, rtol=1e-4, atol=1e-6, msg=name)
