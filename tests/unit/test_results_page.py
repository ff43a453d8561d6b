"""scripts/results.py: docs/results/<recipe>.md generated from run folders (report.json + resolved.yaml):
the header (commit, machine, command), a column per seed, the median and the range."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scripts_results", REPO / "scripts" / "results.py")
results = importlib.util.module_from_spec(_spec)
sys.modules["scripts_results"] = results  # dataclasses look their module up
_spec.loader.exec_module(results)


def _run(root: Path, name: str, seed: int, gold: tuple[float, float], rm: float, seconds: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "resolved.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed, "stages": []}))
    records = [
        {"round": 1, "stage": "sft", "kind": "sft", "metrics": {"train_loss_last": 0.5, "steps": 1272.0},
         "artifacts": {}, "stage_seconds": seconds},
        {"round": 1, "stage": "eval_sft", "kind": "evaluate", "artifacts": {}, "stage_seconds": 20.0,
         "metrics": {"gold_helpfulness": gold[0], "safety_violation_rate": 0.2}},
        {"round": 1, "stage": "rm_helpful", "kind": "reward_model", "artifacts": {},
         "metrics": {"rm_accuracy": rm}},
        {"round": 1, "stage": "eval_dpo", "kind": "evaluate", "artifacts": {},
         "metrics": {"gold_helpfulness": gold[1], "safety_violation_rate": 0.1}},
    ]
    (folder / "report.json").write_text(json.dumps(records))
    return folder


def _row(md: list[str], *first: str) -> list[str]:
    """The cells of the table row that starts with ``first``."""
    for line in md:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first}")


def test_two_seeds_give_a_column_each_the_median_and_the_range(tmp_path):
    runs = [_run(tmp_path, "llama3_round_s1", 1, (0.836, 0.897), 0.932, 130.0),
            _run(tmp_path, "llama3_round", 0, (0.784, 0.893), 0.957, 125.0)]
    out = tmp_path / "results"
    assert results.main([*map(str, runs), "--out", str(out), "--commit", "abc123 + uncommitted changes",
                         "--machine", "AMD EPYC (family 26), 2 cores"]) == 0
    md = (out / "llama3_round.md").read_text().splitlines()  # both folders: one recipe, one page
    assert md[0] == "# Results: `recipes/llama3_round.yaml`"
    assert _row(md, "commit")[1] == "`abc123 + uncommitted changes`"
    assert _row(md, "machine")[1] == "AMD EPYC (family 26), 2 cores"
    assert _row(md, "command")[1] == ("`align run recipes/llama3_round.yaml seed=0`<br>"
                                      "`align run recipes/llama3_round.yaml seed=1 name=llama3_round_s1`")
    # headline: seeds in order, then median and range
    assert _row(md, "stage", "metric") == ["stage", "metric", "seed 0", "seed 1", "median", "range"]
    assert _row(md, "eval_sft", "gold helpfulness") == ["eval_sft", "gold helpfulness", "0.784", "0.836",
                                                        "0.81", "0.784–0.836"]
    assert _row(md, "eval_dpo", "gold helpfulness")[2:] == ["0.893", "0.897", "0.895", "0.893–0.897"]
    assert _row(md, "rm_helpful", "RM accuracy")[2:] == ["0.957", "0.932", "0.9445", "0.932–0.957"]
    assert not any(line.startswith("| sft |") for line in md)  # a stage without headline metrics
    # every metric, by stage: the training stage and its time
    every = md[md.index("## Every metric, by stage"):]
    assert "### sft (sft)" in every
    assert _row(every, "steps")[1:] == ["1272", "1272", "1272", "1272–1272"]
    assert _row(every, "stage seconds")[1:] == ["125", "130", "127.5", "125–130"]
    assert not re.search(r"\d\.\d{5,}", "\n".join(md))  # no long floats


def test_one_run_several_rounds_header_from_this_checkout(tmp_path):
    folder = tmp_path / "llama2_rlhf_v1_v5"
    folder.mkdir()
    (folder / "resolved.yaml").write_text(yaml.safe_dump({"name": "llama2_rlhf_v1_v5", "seed": 0}))
    (folder / "report.json").write_text(json.dumps([
        {"round": k, "stage": "eval", "kind": "evaluate", "artifacts": {},
         "metrics": {"gold_helpfulness": g}} for k, g in ((1, 0.7), (2, 0.75))]))
    assert results.main([str(folder), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "llama2_rlhf_v1_v5.md").read_text().splitlines()
    assert _row(md, "stage", "metric") == ["stage", "metric", "round 1", "round 2"]
    assert _row(md, "eval", "gold helpfulness")[2:] == ["0.7", "0.75"]
    assert "### Round 2" in md
    commit = _row(md, "commit")[1].strip("`")
    assert re.fullmatch(r"[0-9a-f]{40}( \+ uncommitted changes)?", commit) or commit.startswith("unknown")
    assert _row(md, "command")[1] == "`align run recipes/llama2_rlhf_v1_v5.yaml seed=0`"
    assert "cores" in _row(md, "machine")[1]


def test_machine_from_cpuinfo():
    cpuinfo = "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu avx2 avx512f\n"
    assert results.machine(cpuinfo, cores=2, threads="2") == \
        "AMD EPYC 9B45 (family 26, model 2, AVX-512), 2 cores, OMP_NUM_THREADS=2"
    assert results.machine("model name\t: X\nflags\t: avx2\n", cores=4, threads="") == \
        "X (AVX2), 4 cores, OMP_NUM_THREADS unset"


def test_several_seeds_of_several_rounds_give_the_median_and_range_per_round(tmp_path):
    for seed, golds in ((0, (0.7, 0.8)), (1, (0.6, 0.9)), (2, (0.65, 0.85))):
        folder = tmp_path / f"v_s{seed}"
        folder.mkdir()
        (folder / "resolved.yaml").write_text(yaml.safe_dump({"name": f"v_s{seed}", "seed": seed}))
        (folder / "report.json").write_text(json.dumps([
            {"round": k, "stage": "eval", "kind": "evaluate", "artifacts": {}, "metrics": {"gold_helpfulness": g}}
            for k, g in zip((1, 2), golds, strict=True)]))
    assert results.main([str(tmp_path / f"v_s{s}") for s in (0, 1, 2)] + ["--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "v.md").read_text().splitlines()
    assert _row(md, "eval", "gold helpfulness")[2:] == ["0.65 (0.6–0.7)", "0.85 (0.8–0.9)"]
