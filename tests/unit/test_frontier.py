"""eval.frontier: the Pareto front by hand, the seeds' mean and spread, and the rows read from a run folder
laid out as recipes/dpo_vs_ppo.yaml leaves it."""

from __future__ import annotations

import json

import pytest
import yaml

from eval.frontier import change_from_start, checkpoint_rows, compute_rows, pareto_front, summarise


def test_pareto_front_by_hand():
    # (kl, gold): (0.5, 0.70) is beaten by (0.2, 0.72); (1.0, 0.72) only ties the best so far; at kl 2.0
    # the better of the two points counts
    pts = [(1.0, 0.72), (0.0, 0.70), (0.2, 0.72), (0.5, 0.70), (2.0, 0.74), (2.0, 0.80), (3.0, 0.79)]
    assert pareto_front(pts) == [(0.0, 0.70), (0.2, 0.72), (2.0, 0.80)]
    # violations: lower is better
    assert pareto_front([(0.0, 0.10), (0.3, 0.12), (0.4, 0.05), (0.9, 0.05)], higher_is_better=False) == [
        (0.0, 0.10), (0.4, 0.05)]


def test_summarise_means_and_spreads_over_seeds():
    rows = [{"method": "PPO (RMs)", "value": 0.1, "checkpoint": 1, "kl": kl, "gold_helpfulness": g}
            for kl, g in ((0.2, 0.70), (0.4, 0.76))]
    rows.append({"method": "PPO (RMs)", "value": 0.1, "checkpoint": 2, "kl": 0.9, "gold_helpfulness": None})
    (s,) = summarise(rows, "gold_helpfulness")
    assert s["seeds"] == 2 and s["kl"] == pytest.approx(0.3) and s["kl_min"] == 0.2 and s["kl_max"] == 0.4
    assert s["gold_helpfulness"] == pytest.approx(0.73)
    assert (s["gold_helpfulness_min"], s["gold_helpfulness_max"]) == (0.70, 0.76)


def _write_run(root, seed):
    run = root / f"dpo_vs_ppo_s{seed}"
    stages = [
        {"name": "sft_rs", "kind": "sft"},
        {"name": "eval_start", "kind": "evaluate", "model": {"from": "sft_rs"}, "reference": {"from": "sft_rs"}},
        {"name": "pairs_gold", "kind": "rejection_sampling", "reward": {"function": "gold"}},
        {"name": "pairs_rm", "kind": "rejection_sampling", "reward": {"function": None, "helpful": {"from": "rm"}}},
        {"name": "dpo_a", "kind": "dpo", "beta": 0.1, "data": {"from": "pairs_gold"}},
        {"name": "dpo_b", "kind": "dpo", "beta": 0.5, "data": {"from": ["pairs_rm"]}},
        {"name": "ppo_a", "kind": "ppo", "kl_coef": 0.05, "reward": {"function": None}},
        *[{"name": f"eval_{n}", "kind": "evaluate", "model": {"from": n}, "reference": {"from": "sft_rs"}}
          for n in ("dpo_a", "dpo_b", "ppo_a")],
    ]
    (run / "round_1").mkdir(parents=True)
    (run / "resolved.yaml").write_text(yaml.safe_dump({"name": run.name, "seed": seed, "stages": stages}))

    def stage(name, result, **files):
        folder = run / "round_1" / name
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(result))
        for fname, rows in files.items():
            (folder / fname.replace("_", ".")).write_text("".join(json.dumps(r) + "\n" for r in rows))

    stage("eval_start", {"metrics": {"gold_helpfulness": 0.7, "safety_violation_rate": 0.1}})
    stage("pairs_gold", {"seconds": 30.0, "metrics": {}})
    stage("pairs_rm", {"seconds": 40.0, "metrics": {}})
    stage("dpo_a", {"seconds": 5.0, "metrics": {"train_tokens": 1000.0}})
    stage("dpo_b", {"seconds": 6.0, "metrics": {"train_tokens": 2000.0}})
    stage("ppo_a", {"seconds": 100.0, "metrics": {}},
          metrics_jsonl=[{"step": 1, "train/tokens": 50.0, "train/optimizer_steps": 4.0},
                         {"step": 2, "train/tokens": 60.0, "train/optimizer_steps": 4.0}])
    for name, kls in (("dpo_a", (0.01, 0.02)), ("dpo_b", (0.03, 0.05)), ("ppo_a", (0.1, 0.3))):
        stage(f"eval_{name}", {"metrics": {}}, snapshots_jsonl=[
            {"step": s, "kl_to_reference": kl, "gold_helpfulness": 0.7 + kl + seed / 100, "safety_violation_rate": 0.1}
            for s, kl in zip((10, 20), kls, strict=True)])
    return run


def test_rows_of_a_comparison_run(tmp_path):
    runs = [_write_run(tmp_path, 0), _write_run(tmp_path, 1)]
    rows = checkpoint_rows(runs)
    start = [r for r in rows if r["method"] == "start"]
    assert [(r["seed"], r["kl"], r["gold_helpfulness"]) for r in start] == [(0, 0.0, 0.7), (1, 0.0, 0.7)]
    ppo = [r for r in rows if r["run"] == "ppo_a" and r["seed"] == 1]
    assert [(r["method"], r["knob"], r["value"], r["step"], r["checkpoint"], r["kl"]) for r in ppo] == [
        ("PPO (RMs)", "kl_coef", 0.05, 10, 1, 0.1), ("PPO (RMs)", "kl_coef", 0.05, 20, 2, 0.3)]
    assert ppo[1]["gold_helpfulness"] == pytest.approx(0.7 + 0.3 + 0.01)
    methods = {r["run"]: r["method"] for r in rows}
    assert methods["dpo_a"] == "DPO (gold pairs)" and methods["dpo_b"] == "DPO (RM pairs)"
    assert {r["value"] for r in rows if r["run"] == "dpo_b"} == {0.5}
    cost = {(c["seed"], c["run"]): c for c in compute_rows(runs)}
    assert cost[(0, "dpo_a")]["seconds"] == 35.0 and cost[(0, "dpo_a")]["tokens"] == 1000.0  # + its pairs
    assert cost[(0, "dpo_b")]["seconds"] == 46.0
    assert cost[(1, "ppo_a")]["seconds"] == 100.0 and cost[(1, "ppo_a")]["tokens"] == 440.0


def test_change_from_start_pairs_each_seed_with_its_own_start(tmp_path):
    runs = [_write_run(tmp_path, 0), _write_run(tmp_path, 1)]
    changed = change_from_start(checkpoint_rows(runs))
    ppo = {(r["seed"], r["checkpoint"]): r for r in changed if r["run"] == "ppo_a"}
    # gold 0.7 + kl + seed / 100 against a start of 0.7 for both seeds
    assert ppo[(0, 2)]["gold_helpfulness"] == pytest.approx(0.3)
    assert ppo[(1, 2)]["gold_helpfulness"] == pytest.approx(0.31)
    assert ppo[(1, 2)]["kl"] == 0.3  # the KL is already measured from the start
    assert all(r["gold_helpfulness"] == 0 for r in changed if r["method"] == "start")
    with pytest.raises(ValueError, match="no start row"):
        change_from_start([r for r in checkpoint_rows(runs) if r["method"] != "start"])


def test_method_labels_follow_what_rewards_the_run():
    from eval.frontier import method_of

    stages = {"pairs": {"reward": {"function": "sentiment"}}, "pairs_rm": {"reward": {"model": {"from": "rm"}}}}
    assert method_of({"kind": "ppo", "reward": {"function": "sentiment"}}, stages) == "PPO (sentiment)"
    assert method_of({"kind": "ppo", "reward": {"model": {"from": "rm"}}}, stages) == "PPO (RM)"
    assert method_of({"kind": "ppo", "reward": {"helpful": {}, "safety": {}}}, stages) == "PPO (RMs)"
    assert method_of({"kind": "dpo", "data": {"from": "pairs"}}, stages) == "DPO (sentiment pairs)"
    assert method_of({"kind": "dpo", "data": {"from": "pairs_rm"}}, stages) == "DPO (RM pairs)"


def test_best_of_n_rows_and_their_own_start(tmp_path):
    from eval.frontier import BEST_OF_N, best_of_n_rows, stage_seconds

    run = tmp_path / "run"
    stages = [{"name": "eval_start", "kind": "evaluate", "model": {"from": "x"}, "reference": {"from": "x"}},
              {"name": "bon", "kind": "rejection_sampling", "best_of": [1, 4]},
              {"name": "pairs", "kind": "rejection_sampling"}]
    (run / "round_1" / "bon").mkdir(parents=True)
    (run / "resolved.yaml").write_text(yaml.safe_dump({"seed": 3, "stages": stages}))
    (run / "round_1" / "bon" / "result.json").write_text(json.dumps({"seconds": 90.0, "metrics": {
        "best_of_1/kl": 0.0, "best_of_1/sentiment": 0.2, "best_of_4/kl": 0.636, "best_of_4/sentiment": 0.7,
        "best_of_4/word_repeat_rate": 0.0}}))
    rows = best_of_n_rows([run])
    assert [(r["method"], r["value"], r["kl"], r["sentiment"]) for r in rows] == [
        (BEST_OF_N, 1.0, 0.0, 0.2), (BEST_OF_N, 4.0, 0.636, 0.7)]
    start = {"seed": 3, "method": "start", "value": None, "sentiment": 0.3}
    changed = change_from_start([start, *rows])
    assert [r["sentiment"] for r in changed[1:]] == pytest.approx([0.0, 0.5])  # from N = 1, not the other start
    assert stage_seconds([run]) == [{"seed": 3, "stage": "bon", "kind": "rejection_sampling", "minutes": 1.5}]


def test_fronts_compared_at_equal_kl_by_hand():
    from eval.frontier import compare_fronts, front_at

    front = [(0.5, 0.3), (2.0, 0.6)]
    assert front_at(front, 0.4) is None and front_at(front, 1.0) == 0.3 and front_at(front, 5.0) == 0.6
    summary = [{"method": "A", "kl": 0.5, "s": 0.3}, {"method": "A", "kl": 2.0, "s": 0.6},
               {"method": "B", "kl": 1.0, "s": 0.2}, {"method": "B", "kl": 8.0, "s": 0.9}]
    out = compare_fronts(summary, "s", "A", "B", points=3)  # budgets from 1.0 (both reach it) to 8.0
    assert [c["kl"] for c in out] == pytest.approx([1.0, 8 ** 0.5, 8.0])
    assert [c["difference"] for c in out] == pytest.approx([0.1, 0.4, -0.3])  # .3 - .2, .6 - .2, .6 - .9
    assert compare_fronts(summary[:2], "s", "A", "B") == []  # B has no point


def test_best_checkpoints_against_the_bar_by_hand():
    from eval.frontier import best_checkpoints

    def row(seed, method, score, kl=1.0, value=0.1, checkpoint=1, repeats=0.0):
        return {"seed": seed, "method": method, "sentiment": score, "kl": kl, "value": value,
                "checkpoint": checkpoint, "word_repeat_rate": repeats}

    rows = [row(0, "start", 0.4, kl=0.0, value=None, checkpoint=0, repeats=0.01),
            row(0, "DPO", 0.62, kl=3.0, checkpoint=1), row(0, "DPO", 0.71, kl=9.0, checkpoint=3, repeats=0.03),
            row(0, "PPO-GT", 0.64, kl=2.0, value=0.05, checkpoint=2), row(0, "best-of-N", 0.99, value=64.0),
            row(1, "start", 0.6, kl=0.0, value=None, checkpoint=0), row(1, "DPO", 0.79, kl=4.0)]
    got = {(b["seed"], b["method"]): b for b in best_checkpoints(rows, "sentiment")}
    assert set(got) == {(0, "DPO"), (0, "PPO-GT"), (1, "DPO")}  # best-of-N is a baseline, not a method here
    dpo = got[0, "DPO"]  # bar: min(0.25, (1 - 0.4) / 2 = 0.3) = 0.25; gain 0.31
    assert dpo["bar"] == 0.25 and dpo["gain"] == pytest.approx(0.31) and dpo["meets_bar"]
    assert (dpo["kl"], dpo["checkpoint"], dpo["repeats"], dpo["repeats_limit"]) == (9.0, 3, 0.03, 0.02)
    assert got[0, "PPO-GT"]["gain"] == pytest.approx(0.24) and not got[0, "PPO-GT"]["meets_bar"]
    seed1 = got[1, "DPO"]  # bar: min(0.25, (1 - 0.6) / 2 = 0.2) = 0.2; gain 0.19
    assert seed1["bar"] == pytest.approx(0.2) and not seed1["meets_bar"]
    with pytest.raises(ValueError, match="seed 2 has no start row"):
        best_checkpoints([row(2, "DPO", 0.5)], "sentiment")
