"""Rejection sampling passes its settings through:

- ``reward.safety_threshold`` / ``threshold_scale``: two real reward-model checkpoints whose head is zero
  (every raw score is 0, sigmoid 0.5) and whose saved stats whiten 0 to +1 (helpful) and -2 (safety):
  the reward of every sample says which model the stage used. Default (whitened): sigmoid(-2) = 0.119 <
  0.15 -> safety (-2); sigmoid scale: 0.5 < 0.15? no -> helpful (+1); < 0.6? yes -> safety (-2).
- ``pool_previous_rounds``: round 2 chooses among round 1's samples too; on a prompt where round 1's
  best beats every round-2 sample, round 2 keeps round 1's sample.
"""

import json

import pytest
import torch

from align.config.recipe import recipe_from_dict
from align.config.specs import ModelSpec
from align.models.reward import load_reward_model, load_reward_tokenizer
from align.runner import run_recipe
from rewards.whitening import RewardStats

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
PROMPTS = ["What is 2 plus 3?", "Name a color.", "Spell cat backwards.", "Say hello.", "What is 7 minus 1?",
           "Name an animal."]


def save_rm(folder, head: str, stats: RewardStats | None):
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tok = load_reward_tokenizer(spec, "builtin:tiny")
    model = load_reward_model(spec, "builtin:tiny", tok, seed=0)
    with torch.no_grad():
        if head == "zero":
            model.score.weight.zero_()
        else:
            model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if stats is not None:
        stats.save(folder)
    return str(folder)


def write_prompts(path, n):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:n]))
    return str(path)


def rs_stage(name, prompts, reward, **kw):
    return {"name": name, "kind": "rejection_sampling", "model": {"path": "builtin:tiny", "tiny": TINY},
            "prompts": {"paths": [prompts]}, "reward": reward, "k": 3,
            "sampling": {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 8, "seed": 1}, **kw}


def rows(path):
    return [json.loads(x) for x in open(path)]


def kept_file(record):
    """The kept best-of-K samples (SFT records); the artifact's name changed from 'data' to 'sft_records'."""
    artifacts = record["artifacts"]
    return artifacts.get("sft_records") or artifacts["data"]


@pytest.mark.slow  # three stages, each in its own process: ~15 s
def test_rs_stage_uses_its_safety_threshold_and_scale(tmp_path):
    helpful = save_rm(tmp_path / "helpful", "zero", RewardStats(mean=-1.0, std=1.0, count=10))
    safety = save_rm(tmp_path / "safety", "zero", RewardStats(mean=2.0, std=1.0, count=10))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    both = {"helpful": {"path": helpful}, "safety": {"path": safety}}
    stages = [
        rs_stage("rs_default", prompts, both),  # Llama 2's 0.15 on the whitened scale
        rs_stage("rs_sigmoid", prompts, {**both, "threshold_scale": "sigmoid"}),
        rs_stage("rs_high", prompts, {**both, "threshold_scale": "sigmoid", "safety_threshold": 0.6}),
    ]
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": stages})
    by = {r["stage"]: r for r in run_recipe(recipe, log=lambda *_: None)}
    want = {"rs_default": -2.0, "rs_sigmoid": 1.0, "rs_high": -2.0}
    for name, reward in want.items():
        m = by[name]["metrics"]
        assert m["safety_scored_share"] == (1.0 if reward == -2.0 else 0.0), name  # no prompt is tagged safety
        assert m["kept"] > 0, name
        assert m["reward_best_mean"] == pytest.approx(reward, abs=1e-5), name
        assert m["reward_sample_mean"] == pytest.approx(reward, abs=1e-5), name
        assert [r["meta"]["score"] for r in rows(kept_file(by[name]))] == pytest.approx(
            [reward] * int(m["kept"]), abs=1e-5), name


@pytest.mark.slow  # two rounds: ~5 s
def test_pool_previous_rounds_keeps_a_better_round_one_sample(tmp_path):
    rm = save_rm(tmp_path / "rm", "spread", None)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    stage = rs_stage("rs", prompts, {"model": {"path": rm}, "whiten": False}, pool_previous_rounds=True)
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "rounds": 2,
                               "stages": [stage]})
    r1, r2 = run_recipe(recipe, log=lambda *_: None)

    def key(messages):
        return json.dumps([[m["role"], m["content"]] for m in messages])

    def scored(record):  # prompt key -> {text: score}
        out = {}
        for row in rows(record["artifacts"]["samples"]):
            out.setdefault(key(row["prompt"]), {})[row["response"]["content"]] = row["score"]
        return out

    round1, round2 = scored(r1), scored(r2)
    kept2 = {key(r["messages"][:-1]): r["messages"][-1]["content"] for r in rows(kept_file(r2))}
    decided_by_pool = 0
    for k, first in round1.items():
        assert set(first) <= set(round2[k])  # round 1's samples were candidates in round 2 ...
        for text, score in first.items():  # ... rescored by this round's reward (the same model here)
            assert round2[k][text] == pytest.approx(score, abs=1e-5)
        own = {t: s for t, s in round2[k].items() if t not in first}  # round 2's own samples
        assert own, "round 2 generated nothing new"
        assert kept2[k] == max(round2[k], key=round2[k].get)
        best1 = max(first, key=first.get)
        if first[best1] > max(own.values()):
            assert kept2[k] == best1  # without the pool round 2 would keep one of its own, worse
            decided_by_pool += 1
    assert decided_by_pool >= 1, "no prompt where round 1's best beats round 2 (change the seeds)"
