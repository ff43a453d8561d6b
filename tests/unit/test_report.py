"""report.md opens with one compact table of the metrics that matter; one table per stage kind follows;
report.png plots the gold metrics by stage; ``align report RUN_DIR`` prints the compact table."""

from __future__ import annotations

import importlib.util
import json

from align.cli import main
from align.report import compact_rows, write_report

RECORDS = [
    {"round": 1, "stage": "sft", "kind": "sft", "metrics": {"train_loss_last": 0.5, "steps": 10.0},
     "artifacts": {"policy": "/r/round_1/sft/model"}, "stage_seconds": 125.0},
    {"round": 1, "stage": "eval_sft", "kind": "evaluate",
     "metrics": {"gold_helpfulness": 0.7093, "safety_violation_rate": 0.2, "over_refusal_rate": 0.05,
                 "accuracy/add": 0.9}, "artifacts": {}, "stage_seconds": 20.4},
    {"round": 1, "stage": "rm_helpful", "kind": "reward_model", "metrics": {"rm_accuracy": 0.88123},
     "artifacts": {}, "stage_seconds": 61.0},
    {"round": 1, "stage": "rs", "kind": "rejection_sampling",
     "metrics": {"gold_best_mean": 0.82, "gold_sample_mean": 0.611, "kept": 100.0}, "artifacts": {}},
    {"round": 1, "stage": "eval_dpo", "kind": "evaluate",
     "metrics": {"gold_helpfulness": 0.73, "safety_violation_rate": 0.1, "over_refusal_rate": 0.04,
                 "kl_to_reference": 0.0123}, "artifacts": {}, "stage_seconds": 19.0},
]


def test_compact_table_by_stage():
    header, rows = compact_rows(RECORDS)
    assert header == ["round", "stage", "kind", "gold helpfulness", "violation rate", "over-refusal",
                      "KL to reference", "RM accuracy", "gold kept / mean (RS)", "time"]
    assert rows[0] == ["1", "sft", "sft", "", "", "", "", "", "", "2:05"]
    assert rows[1][3:6] == ["0.709", "0.200", "0.050"] and rows[1][-1] == "0:20"
    assert rows[2][7] == "0.881" and rows[3][8] == "0.820 / 0.611" and rows[3][-1] == ""
    assert rows[4][6] == "0.012"
    # columns no stage has are left out
    header, _ = compact_rows(RECORDS[:2])
    assert "RM accuracy" not in header and "KL to reference" not in header


def test_report_files_and_the_command(tmp_path, capsys):
    write_report(tmp_path, "demo", RECORDS)
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "# demo" and md[2].startswith("| round | stage | kind | gold helpfulness |")
    assert "| 1 | eval_sft | evaluate | 0.709 | 0.200 | 0.050 |" in md[5]
    assert "### evaluate" in md and "### reward_model" in md  # one table per kind, every metric
    evaluate = md.index("### evaluate")
    assert "accuracy/add" in md[evaluate + 2]
    assert json.loads((tmp_path / "report.json").read_text()) == RECORDS
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "report.png").stat().st_size > 1000 and "![gold metrics by stage](report.png)" in md
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["round", "stage", "kind", "gold"]
    assert out[3].split()[:6] == ["1", "eval_sft", "evaluate", "0.709", "0.200", "0.050"]
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_real_data_columns_length_baseline_logp_preference_and_rewards():
    records = [
        {"round": 1, "stage": "rm", "kind": "reward_model", "artifacts": {},
         "metrics": {"rm_accuracy": 0.61, "rm_accuracy_length_baseline": 0.69}},
        {"round": 1, "stage": "dpo", "kind": "dpo", "artifacts": {},
         "metrics": {"eval_logp_accuracy_start": 0.4, "eval_logp_accuracy": 0.55, "eval_reward_accuracy": 0.6}},
        {"round": 1, "stage": "eval_dpo", "kind": "evaluate", "artifacts": {},
         "metrics": {"reward/safety": -0.25, "reward/helpful": 0.5}},
    ]
    header, rows = compact_rows(records)
    assert header[3:7] == ["RM accuracy", "RM length baseline", "DPO held-out reward accuracy",
                           "DPO held-out logp preference"]
    assert rows[0][3:5] == ["0.610", "0.690"] and rows[1][5:7] == ["0.600", "0.400 -> 0.550"]
    assert rows[2][header.index("mean RM score")] == "helpful +0.50 / safety -0.25"


def _answers(path, answers):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "response": {"role": "assistant", "content": a}}) + "\n"
                            for q, a in answers))


def test_generations_before_and_after_side_by_side(tmp_path):
    _answers(tmp_path / "round_1/eval_base/answers.jsonl",
             [("Q1?", "base one"), ("Q2?", "base | two"), ("Q3?", "base three"), ("Q4?", "base four")])
    _answers(tmp_path / "round_1/eval_dpo/answers.jsonl",  # Q2's answer was blank (left out)
             [("Q1?", "dpo one " + "x" * 300), ("Q3?", "dpo three"), ("Q4?", "dpo four")])
    records = [{"round": 1, "stage": s, "kind": "evaluate", "metrics": {},
                "artifacts": {"samples": f"round_1/{s}/answers.jsonl"}} for s in ("eval_base", "eval_dpo")]
    write_report(tmp_path, "g", records)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Generations"):]
    assert section.count("**Prompt ") == 3
    assert "**Prompt 1.** Q1?" in section and "**Prompt 2.** Q2?" in section and "Q4?" not in section
    assert "| eval_base | base \\| two |" in section and "| eval_dpo | (blank: left out) |" in section
    assert "| eval_dpo | dpo one " + "x" * 229 + "... |" in section


def test_generations_found_with_paths_as_the_runner_writes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs/g"
    _answers(run / "round_1/eval_a/answers.jsonl", [("Q1?", "one")])
    records = [{"round": 1, "stage": "eval_a", "kind": "evaluate", "metrics": {},
                "artifacts": {"samples": "runs/g/round_1/eval_a/answers.jsonl"}}]  # from the cwd
    write_report(run, "g", records)
    assert "| eval_a | one |" in (run / "report.md").read_text()
