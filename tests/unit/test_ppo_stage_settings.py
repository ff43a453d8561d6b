"""The PPO stage passes each of its settings to the math: a test here fails if the stage ignores one."""

from __future__ import annotations

import pytest
import torch

from align.config.ppo import PPOStage
from align.config.specs import ModelSpec
from align.models.loading import build_tiny_model
from align.models.policy_value import PolicyAndValue, token_logps
from align.rl.advantages import advantages_of, gae, kl_penalized_rewards, masked_whiten
from align.train.ppo import stage_loss
from align.train.rollouts import eos_penalized

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def stage(**kw) -> PPOStage:
    base = {"name": "ppo", "model": {"path": "builtin:tiny", "tiny": TINY}, "reward": {"function": "gold"},
            "prompts": {"builtin": "world"}, "rollout_batch_size": 4, "train": {"batch_size": 2}}
    return PPOStage(**{**base, **kw})


def test_missing_eos_penalty_adds_or_replaces():
    scores, no_eos = torch.tensor([0.5, -0.2, 1.0]), torch.tensor([False, True, True])
    assert torch.equal(eos_penalized(scores, no_eos, None, "add"), scores)
    assert torch.allclose(eos_penalized(scores, no_eos, -1.0, "add"), torch.tensor([0.5, -1.2, 0.0]))
    assert torch.allclose(eos_penalized(scores, no_eos, -1.0, "replace"), torch.tensor([0.5, -1.0, -1.0]))


@pytest.fixture(scope="module")
def batch():
    from align.models.reward import seq_cls_from_causal
    from align.rl.rollout import Rollout

    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    policy, old = build_tiny_model(spec, 262, seed=0), build_tiny_model(spec, 262, seed=1)
    model = PolicyAndValue(policy, seq_cls_from_causal(old, seed=2)).eval()
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 250, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.bool)
    response_mask = torch.zeros(3, 9, dtype=torch.bool)
    response_mask[0, 4:9] = response_mask[1, 5:8] = response_mask[2, 3:9] = True
    attention_mask[1, 8] = False
    with torch.no_grad():
        old_logits, old_values = PolicyAndValue(old, seq_cls_from_causal(old, seed=3))(sequences, attention_mask)
    old_logps = token_logps(old_logits, sequences, 1.0) * response_mask
    values = old_values * response_mask
    advantages = torch.randn(3, 9, generator=g) * response_mask
    returns = torch.randn(3, 9, generator=g) * response_mask
    rollout = Rollout(sequences, attention_mask, response_mask, old_logps, old_logps, values,
                      torch.zeros(3), advantages=advantages, returns=returns)
    return model, rollout


def test_loss_uses_cliprange_vf_coef_and_temperature(batch):
    from align.losses.ppo import policy_loss, value_loss

    model, rollout = batch
    results = {}
    for name, kw in {"base": {}, "clip": {"cliprange": 0.05}, "vclip": {"cliprange_value": 0.01},
                     "vf": {"vf_coef": 0.7}, "temp": {"sampling": {"temperature": 0.5}}}.items():
        s = stage(**kw)
        loss, stats = stage_loss(s)(model, rollout)
        logits, values = model(rollout.sequences, rollout.attention_mask)
        logps = token_logps(logits, rollout.sequences, s.sampling.temperature)
        pg, _ = policy_loss(logps, rollout.logps, rollout.advantages, rollout.response_mask, s.cliprange)
        vf, _ = value_loss(values, rollout.values, rollout.returns, rollout.response_mask, s.cliprange_value)
        assert loss.item() == pytest.approx((pg + s.vf_coef * vf).item(), rel=1e-6)
        results[name] = loss.item()
    assert len({round(v, 6) for v in results.values()}) == len(results)  # each setting moved the loss


def test_rewards_advantages_follow_kl_coef_estimator_gamma_lam_and_whitening():
    # the arithmetic a rollout runs, with each setting changed in turn
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:6] = mask[1, 1:4] = True
    logps, ref = -torch.rand(2, 6, generator=g) * mask, -torch.rand(2, 6, generator=g) * mask
    values, scores = torch.randn(2, 6, generator=g) * mask, torch.tensor([1.0, -0.5])
    seen = set()
    for kw in ({}, {"kl_coef": 0.3}, {"kl_estimator": "k3"}, {"gamma": 0.9}, {"lam": 0.5},
               {"whiten_advantages": False}):
        s = stage(**kw)
        _, _, adv, ret = advantages_of(scores, logps, ref, values, mask, kl_coef=s.kl_coef, kl_estimator=s.kl_estimator,
                                      gamma=s.gamma, lam=s.lam, whiten=s.whiten_advantages)
        rewards, _ = kl_penalized_rewards(scores, logps, ref, mask, s.kl_coef, s.kl_estimator)
        expected_adv, expected_ret = gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            expected_adv = masked_whiten(expected_adv, mask)
        assert torch.allclose(adv, expected_adv) and torch.allclose(ret, expected_ret)
        seen.add(round(float((adv * adv.abs().sqrt()).sum() + ret.sum()), 6))
    assert len(seen) == 6


def test_kl_controller_follows_adaptive_kl():
    from align.train.rollouts import kl_controller

    fixed = kl_controller(stage(kl_coef=0.3))
    fixed.update(100.0, 64)
    assert fixed.value == 0.3
    adaptive = kl_controller(stage(kl_coef=0.3, adaptive_kl={"target": 1.0, "horizon": 640}))
    adaptive.update(100.0, 64)  # far above target: error clipped to 0.2, x (1 + 0.2 * 64 / 640)
    assert adaptive.value == pytest.approx(0.3 * 1.02)


def test_value_head_starts_on_the_whitened_reward_scale(tmp_path):
    import json

    from align.models.reward import seq_cls_from_causal, whiten_value_head

    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    (tmp_path / "reward_stats.json").write_text(json.dumps({"mean": -1.0, "std": 4.0, "count": 10}))
    for reward, expected in (({"helpful": {"path": str(tmp_path)}, "safety": {"path": str(tmp_path)}}, 0.25),
                             ({"helpful": {"path": str(tmp_path)}, "safety": {"path": str(tmp_path)},
                               "whiten": False}, 1.0)):
        value = seq_cls_from_causal(build_tiny_model(spec, 262, seed=0), seed=1)
        before = value.score.weight.detach().clone()
        s = stage(reward=reward)
        whiten_value_head(value, str(tmp_path), s.reward.whiten and s.reward.function is None)
        assert torch.allclose(value.score.weight, before * expected)


def test_the_stage_rescales_its_value_head_from_the_reward_models_stats(tmp_path):
    # through the PPO stage's own loading: a value model that starts from the RM starts on the whitened scale
    import json
    from types import SimpleNamespace

    from align.models.loading import save_checkpoint
    from align.models.reward import backbone_and_head, load_reward_model, load_reward_tokenizer
    from align.train.ppo import PPO

    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tokenizer = load_reward_tokenizer(spec, "builtin:tiny")
    rm = load_reward_model(spec, "builtin:tiny", tokenizer, seed=0)
    save_checkpoint(rm, tokenizer, tmp_path / "rm")
    (tmp_path / "rm" / "reward_stats.json").write_text(json.dumps({"mean": -1.0, "std": 4.0, "count": 10}))
    saved = backbone_and_head(rm)[1].weight.detach().clone()
    ctx = SimpleNamespace(seed=0, model_path=lambda s, kinds=None: s.path)
    for whiten, expected in ((True, 0.25), (False, 1.0)):
        task = PPO(stage(reward={"model": {"path": str(tmp_path / "rm")}, "whiten": whiten}), ctx)
        value, _ = task._value_model(len(tokenizer))
        assert torch.allclose(backbone_and_head(value)[1].weight, saved * expected)


def test_the_rollout_source_passes_kl_coef_estimator_gamma_lam_and_whitening(monkeypatch):
    # through the stage's rollout source: its rewards and advantages follow each setting
    from types import SimpleNamespace

    from accelerate import Accelerator

    from align.generation.protocol import Sample
    from align.models.loading import load_tokenizer
    from align.models.reward import seq_cls_from_causal
    from align.train import rollouts

    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    model = PolicyAndValue(build_tiny_model(spec, 262, seed=0),
                           seq_cls_from_causal(build_tiny_model(spec, 262, seed=2), seed=3))
    reference = build_tiny_model(spec, 262, seed=1).eval()  # not the policy: the KL is not 0
    samples = [Sample([5, 6, 7], "a", "stop", None, (1, 2, 3)), Sample([8, 9], "b", "length", None, (4, 5, 6, 7))]
    monkeypatch.setattr(rollouts, "_generate", lambda *args: samples)
    prompts = [SimpleNamespace(prompt=[{"role": "user", "content": "x"}], is_safety=False)] * 2
    scores = torch.tensor([1.0, -0.5], dtype=torch.float64)
    seen = set()
    for kw in ({}, {"kl_coef": 0.3}, {"kl_estimator": "k3"}, {"gamma": 0.9}, {"lam": 0.5},
               {"whiten_advantages": False}):
        s = stage(rollout_batch_size=2, **kw)
        source = rollouts.RolloutSource(s, SimpleNamespace(seed=0, round=1), Accelerator(cpu=True), prompts,
                                        load_tokenizer(spec, "builtin:tiny"), reference,
                                        lambda p, r, t: scores, sampler=None)
        r = source._roll_out(0, model).rollout
        rewards, _ = kl_penalized_rewards(scores.float(), r.logps, r.ref_logps, r.response_mask, s.kl_coef,
                                          s.kl_estimator)
        adv, ret = gae(rewards, r.values, r.response_mask, s.gamma, s.lam)
        adv = masked_whiten(adv, r.response_mask) if s.whiten_advantages else adv
        assert torch.allclose(r.rewards, rewards) and torch.allclose(r.advantages, adv) and torch.allclose(r.returns, ret)
        seen.add(round(float((r.advantages * r.advantages.abs().sqrt()).sum() + r.returns.sum() + r.rewards.sum()), 6))
    assert len(seen) == 6
