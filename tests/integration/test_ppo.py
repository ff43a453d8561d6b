"""PPO stage on a tiny model: a few iterations change the policy and the value model, the KL to the
reference grows from 0, and a run killed after a checkpoint resumes to the same trajectory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import align.train.ppo as ppo
import align.train.rollouts as rollouts
from align.config.recipe import recipe_from_dict
from align.runner import run_recipe, run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def recipe(tmp_path, **ppo_settings):
    stage = {
        "name": "ppo", "kind": "ppo",
        "model": {"path": "builtin:tiny", "tiny": TINY},
        "prompts": {"builtin": "world", "builtin_size": 32},
        "reward": {"function": "gold"},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8, "batch_size": 8},
        "iterations": 3, "rollout_batch_size": 8, "ppo_epochs": 2, "kl_coef": 0.05,
        "train": {"batch_size": 4, "report_to": [], "optim": {"lr": 1e-2, "warmup_ratio": 0.0}},
        **ppo_settings,
    }
    return {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": [stage]}


def rows(stage_dir):
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_changes_policy_and_value_and_moves_away_from_the_reference(tmp_path):
    (record,) = run_recipe(recipe_from_dict(recipe(tmp_path)), log=lambda *_: None)
    m = record["metrics"]
    assert m["kl_first"] == 0.0 and m["kl_k3_first"] == 0.0  # the first rollout comes from the reference
    assert m["kl_k3_last"] > 1e-4  # non-negative estimator: the policy moved away
    assert m["iterations"] == 3.0
    stage_dir = tmp_path / "runs/t/round_1/ppo"
    history = rows(stage_dir)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert all(r["train/optimizer_steps"] == 2 * 8 / 4 for r in history)  # ppo_epochs x minibatches
    for r in history:
        for key in ("train/pg_loss", "train/vf_loss", "train/entropy", "train/clipfrac", "train/approx_kl",
                    "train/explained_variance", "train/score", "train/no_eos_rate", "train/gold_helpfulness"):
            assert key in r and r[key] == r[key], key
    # the policy and the value model were trained (and saved as plain HF folders)
    from align.config.specs import ModelSpec
    from align.models.loading import build_tiny_model

    start = build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), 262, seed=0).state_dict()
    after = load_file(str(stage_dir / "model" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(start[name], after[name])
    value = load_file(str(stage_dir / "value_model" / "model.safetensors"))
    assert "score.weight" in value


def test_resume_after_a_kill_gives_the_same_trajectory(tmp_path, monkeypatch):
    settings = {"iterations": 4, "train": {"batch_size": 4, "report_to": [], "save_every": 2,
                                           "optim": {"lr": 1e-2, "warmup_ratio": 0.0}}}
    clean = recipe_from_dict(recipe(tmp_path / "clean", **settings))
    run_stage(clean, "ppo", 1, "fp")
    calls = []
    real = rollouts._generate

    def killed_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during iteration 3, after the checkpoint of iteration 2
        return real(*args, **kwargs)

    monkeypatch.setattr(rollouts, "_generate", killed_at_third)
    data = recipe_from_dict(recipe(tmp_path / "killed", **settings))
    with pytest.raises(KeyboardInterrupt):
        run_stage(data, "ppo", 1, "fp")
    monkeypatch.setattr(rollouts, "_generate", real)
    run_stage(data, "ppo", 1, "fp")
    a = rows(tmp_path / "clean/runs/t/round_1/ppo")
    b = rows(tmp_path / "killed/runs/t/round_1/ppo")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("train/score", "train/kl", "train/pg_loss", "train/vf_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
    wa = load_file(str(tmp_path / "clean/runs/t/round_1/ppo/model/model.safetensors"))
    wb = load_file(str(tmp_path / "killed/runs/t/round_1/ppo/model/model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_ppo_raises_a_learnable_reward(tmp_path, monkeypatch):
    """Reward = the share of 'a' in the answer: a random tiny policy writes 'a' 1 time in 262 (the byte
    vocabulary); 20 iterations of PPO (no KL penalty) make it the most likely byte."""

    def share_of_a(prompts, responses, is_safety=None):
        return torch.tensor([r.count("a") / max(len(r), 1) for r in responses], dtype=torch.float64)

    monkeypatch.setattr(ppo, "build_reward", lambda spec, model_path: share_of_a)
    settings = {"iterations": 20, "rollout_batch_size": 32, "kl_coef": 0.0,
                "sampling": {"temperature": 1.0, "max_new_tokens": 8, "batch_size": 32},
                "train": {"batch_size": 8, "report_to": [], "optim": {"lr": 1e-2, "warmup_ratio": 0.0}}}
    run_stage(recipe_from_dict(recipe(tmp_path, **settings)), "ppo", 1, "fp")
    scores = [r["train/score"] for r in rows(tmp_path / "runs/t/round_1/ppo")]
    assert max(scores[:3]) < 0.05 and min(scores[-2:]) > 0.5, scores


def test_ppo_reports_how_often_the_safety_model_scored_a_helpfulness_prompt(tmp_path):
    """Two reward models whose head is zero (every raw score 0) and whose stats whiten 0 to +1 (helpful) and
    -2 (safety): on the default whitened scale sigmoid(-2) = 0.12 < 0.15, so the safety model scores every
    rollout; on the sigmoid scale 0.5 >= 0.15, so none of the untagged prompts' rollouts."""
    from rewards.whitening import RewardStats
    from tests.integration.test_rs_settings import save_rm

    helpful = save_rm(tmp_path / "helpful", "zero", RewardStats(mean=-1.0, std=1.0, count=10))
    safety = save_rm(tmp_path / "safety", "zero", RewardStats(mean=2.0, std=1.0, count=10))
    both = {"helpful": {"path": helpful}, "safety": {"path": safety}}
    shares = {}
    for name, reward in (("whitened", both), ("sigmoid", {**both, "threshold_scale": "sigmoid"})):
        (record,) = run_recipe(recipe_from_dict(recipe(tmp_path / name, reward=reward, iterations=1)),
                               log=lambda *_: None)
        shares[name] = record["metrics"]["safety_scored_share_first"]
    assert shares == {"whitened": 1.0, "sigmoid": 0.0}
