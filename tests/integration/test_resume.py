"""A run killed after a checkpoint and started again continues from that checkpoint and ends exactly
where an uninterrupted run ends; a third start finds everything up to date and trains nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

STEPS = 12
RECIPE = {
    "name": "resume",
    "seed": 0,
    "stages": [
        {
            "name": "sft",
            "kind": "sft",
            "model": {
                "path": "builtin:tiny",
                "tiny": {
                    "hidden_size": 128,
                    "intermediate_size": 256,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                },
            },
            "data": {"builtin": "chat", "builtin_size": 256, "eval_fraction": 0.05},
            # ~0.1 s a step on one core: the run outlives its step-4 checkpoint by about a second
            "train": {
                "max_steps": STEPS,
                "batch_size": 16,
                "max_length": 128,
                "save_every": 2,
                "report_to": [],
                "optim": {"lr": 1.0e-3},
            },
        }
    ],
}


def command(recipe_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "align.cli", "run", str(recipe_file), "--output-dir", str(out)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def finish(proc: subprocess.Popen, what: str) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout + stderr


def run(cmd: list[str], cwd: Path, what: str) -> str:
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return finish(proc, what)


def train_rows(stage: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (stage / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if "train/loss" in r]


def complete_checkpoints(stage: Path) -> list[int]:
    """Steps of the checkpoints whose loop_state.json (written last) exists."""
    found = []
    for p in (stage / "checkpoints").glob("step_*/loop_state.json"):
        try:
            found.append(json.loads(p.read_text())["step"])
        except (OSError, ValueError, KeyError):  # being written or removed right now
            continue
    return sorted(found)


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE))
    out, ref_out = tmp_path / "runs", tmp_path / "reference"
    stage = out / "resume" / "round_1" / "sft"
    ref_stage = ref_out / "resume" / "round_1" / "sft"

    # the uninterrupted reference runs alongside (two cores, one thread each)
    ref_log = (tmp_path / "reference.log").open("w")
    reference = subprocess.Popen(
        command(recipe_file, ref_out), cwd=tmp_path, env=env(), stdout=ref_log, stderr=subprocess.STDOUT
    )
    # 1. start, wait for the step-4 checkpoint to be complete, kill -9
    victim = subprocess.Popen(
        command(recipe_file, out),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not [s for s in complete_checkpoints(stage) if s >= 4]:
        assert victim.poll() is None, f"the run ended (rc {victim.returncode}) before its step-4 checkpoint"
        assert time.monotonic() < deadline, "no step-4 checkpoint within 240 s"
        time.sleep(0.005)
    finished_early = victim.poll() is not None
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not finished_early and not (stage / "result.json").exists(), (
        "the run finished before it was killed"
    )
    saved = complete_checkpoints(stage)
    assert saved and 4 <= saved[-1] < STEPS, saved

    # 2. the same command again: resumes from the latest complete checkpoint and finishes
    log = run(command(recipe_file, out), tmp_path, "rerun")
    found = re.search(r"resuming from step_(\d+) \(step (\d+)/(\d+)\)", log)
    assert found, f"the rerun did not resume:\n{log[-3000:]}"
    resumed = int(found.group(2))
    print(f"killed after checkpoint {saved[-1]}, resumed at step {resumed}")
    assert resumed == int(found.group(1)) == saved[-1] and 4 <= resumed < STEPS
    assert int(found.group(3)) == STEPS

    rows = train_rows(stage)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, none twice

    reference.wait(timeout=300)
    ref_log.close()
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    ref_rows = train_rows(ref_stage)
    assert [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    losses, ref_losses = [r["train/loss"] for r in rows], [r["train/loss"] for r in ref_rows]
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)  # the whole trajectory, before and after the kill
    assert losses[-1] < losses[0]
    result = json.loads((stage / "result.json").read_text())["metrics"]
    ref_result = json.loads((ref_stage / "result.json").read_text())["metrics"]
    assert result["eval_loss"] == pytest.approx(ref_result["eval_loss"], rel=1e-5)
    assert result["train_tokens"] == ref_result["train_tokens"]  # tokens seen before the kill were kept
    assert result["train_loss_first"] == pytest.approx(ref_result["train_loss_first"], rel=1e-5)  # step 1, not the resume step

    # 3. once more: everything is up to date, nothing is trained or written
    metrics_before = (stage / "metrics.jsonl").read_bytes()
    log = run(command(recipe_file, out), tmp_path, "second rerun")
    assert "up to date" in log and "nothing to do" in log, log[-3000:]
    assert "resuming" not in log and "running" not in log
    assert (stage / "metrics.jsonl").read_bytes() == metrics_before
