"""The README's main command, through the real CLI, on a smaller version of the default round."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "sft.data.builtin_size=2500", "sft.train.epochs=1", "sft.train.save_every=0",
    *[f"{e}.prompts.builtin_size=40" for e in ("eval_sft", "eval_sft_rs", "eval_dpo")],
    "rm_helpful.data.builtin_size=300", "rm_safety.data.builtin_size=300",
    "rm_helpful.train.epochs=1", "rm_safety.train.epochs=1",
    "rs.prompts.builtin_size=64", "rs.k=4", "annotate.prompts.builtin_size=128", "annotate.k=4",
    "sft_rs.train.epochs=1",
]
EVAL_METRICS = {"gold_helpfulness", "safety_violation_rate", "over_refusal_rate"}


@pytest.mark.slow
def test_default_round_runs_and_reports(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "align.cli", "run", str(REPO / "recipes/llama3_round.yaml"),
           "--output-dir", str(tmp_path), *SMALL]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "llama3_round"
    report = json.loads((run / "report.json").read_text())
    assert [(r["round"], r["stage"], r["kind"]) for r in report] == [
        (1, "sft", "sft"), (1, "eval_sft", "evaluate"), (1, "rm_helpful", "reward_model"),
        (1, "rm_safety", "reward_model"), (1, "rs", "rejection_sampling"), (1, "sft_rs", "sft"),
        (1, "eval_sft_rs", "evaluate"), (1, "annotate", "rejection_sampling"), (1, "dpo", "dpo"),
        (1, "eval_dpo", "evaluate"),
    ]
    by = {r["stage"]: r["metrics"] for r in report}
    for name in ("eval_sft", "eval_sft_rs", "eval_dpo"):
        assert EVAL_METRICS <= set(by[name])
    for name in ("eval_sft_rs", "eval_dpo"):
        assert by[name]["kl_to_reference"] >= 0
    for name in ("rm_helpful", "rm_safety"):
        assert by[name]["rm_accuracy"] > 0.5, f"{name} does not beat chance: {by[name]['rm_accuracy']}"
    assert by["rs"]["kept"] > 0 and by["annotate"]["pairs"] > 0
    md = (run / "report.md").read_text().splitlines()
    # the compact table first: every stage by name, the metrics that matter, the time each took
    assert md[2] == ("| round | stage | kind | gold helpfulness | violation rate | over-refusal | KL to reference "
                     "| RM accuracy | RM length baseline | gold kept / mean (RS) | time |")
    compact = [line.split(" | ") for line in md[4:14]]
    assert [row[1] for row in compact] == [r["stage"] for r in report]
    assert all(row[-1].rstrip(" |") for row in compact), "a stage without its time"
    assert compact[1][3] == f"{by['eval_sft']['gold_helpfulness']:.3f}"
    assert compact[2][7] == f"{by['rm_helpful']['rm_accuracy']:.3f}"
    assert compact[2][8] == f"{by['rm_helpful']['rm_accuracy_length_baseline']:.3f}"
    assert "### reward_model" in md and "rm_accuracy" in "\n".join(md)  # then every metric, by kind
    generations = md.index("## Generations, before and after each policy stage")  # each policy's answers
    assert [line for line in md[generations:] if line.startswith("| eval_")][:3] == [
        line for line in md[generations:] if line.startswith(("| eval_sft |", "| eval_sft_rs |", "| eval_dpo |"))][:3]
    shown = subprocess.run([sys.executable, "-m", "align.cli", "report", str(run)], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.splitlines()[3].split()[:3] == ["1", "eval_sft", "evaluate"]
    for r in report:
        for path in r["artifacts"].values():
            assert Path(path).exists()
    # a rerun does no work and says so
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
