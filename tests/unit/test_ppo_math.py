"""PPO math against numbers worked out by hand: rewards, GAE, whitening, KL control, the clipped losses,
entropy, and the Rollout container."""

import json
import math

import pytest
import torch

from align.losses.ppo import entropy_from_logits, policy_loss, value_loss
from align.rl.advantages import gae, kl_penalized_rewards, masked_mean, masked_var, masked_whiten
from align.rl.kl_control import AdaptiveKLController, FixedKLController
from align.rl.rollout import Rollout

T, F = True, False
LN_1_5, LN_2, LN_1_1 = math.log(1.5), math.log(2.0), math.log(1.1)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-7):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---- masked statistics -------------------------------------------------------------------------------------


def test_masked_mean_var_whiten():
    # x = [1, 2, 3 | 100 masked]: mean 2; squared deviations 1 + 0 + 1 = 2;
    # biased var 2 / 3, unbiased (Bessel, n / (n - 1) = 3 / 2) 2 / 2 = 1
    x, mask = tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[T, T, T, F]])
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    # whiten: (x - 2) / sqrt(1 + 1e-8), 0 outside the mask; shift_mean=False adds 2 back
    s = 1 / math.sqrt(1 + 1e-8)
    close(masked_whiten(x, mask), [[-s, 0.0, s, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[2 - s, 2.0, 2 + s, 0.0]])
    # per row: [1, 2, 3] -> 2, [4 | nan masked, 6] -> 5 (NaN outside the mask never leaks)
    y = tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])
    close(masked_mean(y, torch.tensor([[T, T, T], [T, F, T]]), dim=1), [2.0, 5.0])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[T, F, F, F]]))


def test_masked_whiten_over_processes_uses_every_process_s_entries():
    # two "processes" (threads meeting at a barrier) hold [1, 2 | 9 masked] and [3, 6]: the whitening must
    # use the statistics of 1, 2, 3, 6 (mean 3, squared deviations 4 + 1 + 0 + 9 = 14, unbiased var 14 / 3)
    import threading

    shards = [(tensor([[1.0, 2.0, 9.0]]), torch.tensor([[T, T, F]])), (tensor([[3.0, 6.0, 0.0]]), torch.tensor([[T, T, F]]))]
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def process(rank):
        def total(t):
            slots[rank] = t
            barrier.wait()
            result = slots[0] + slots[1]
            barrier.wait()
            return result

        x, mask = shards[rank]
        out[rank] = masked_whiten(x, mask, sum_over_processes=total)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = 1 / math.sqrt(14 / 3 + 1e-8)
    close(out[0], [[-2 * s, -1 * s, 0.0]])
    close(out[1], [[0.0, 3 * s, 0.0]])
    # one process: the same as without the reduction
    x, mask = shards[1]
    close(masked_whiten(x, mask, sum_over_processes=lambda t: t), masked_whiten(x, mask))


# ---- KL-penalised rewards ----------------------------------------------------------------------------------

# row 0: [prompt | 3 response tokens]; row 1: [prompt | 2 response tokens | padding with junk log-probs]
MASK = torch.tensor([[F, T, T, T], [F, T, T, F]])
LOGPS = tensor([[0.0, -1.0, -0.5, -2.0], [0.0, -0.2, -0.3, 5.0]])
REF_LOGPS = tensor([[0.0, -1.5, -0.5, -1.0], [0.0, -0.7, -0.1, 9.0]])
SCORES = tensor([1.0, -2.0])


def test_kl_penalized_rewards_k1():
    # k1 = logps - ref_logps: row 0: [-, 0.5, 0.0, -1.0]; row 1: [-, 0.5, -0.2, -]
    # reward = -0.1 * k1, + score at the last response token (row 0: t=3, row 1: t=2):
    #   row 0: [0, -0.05, 0, 0.1 + 1.0 = 1.1]; row 1: [0, -0.05, 0.02 - 2.0 = -1.98, 0]
    rewards, kl = kl_penalized_rewards(SCORES, LOGPS, REF_LOGPS, MASK, kl_coef=0.1)
    close(kl, [[0.0, 0.5, 0.0, -1.0], [0.0, 0.5, -0.2, 0.0]])
    close(rewards, [[0.0, -0.05, 0.0, 1.1], [0.0, -0.05, -1.98, 0.0]])


def test_kl_penalized_rewards_k3():
    # k3 = exp(r) - 1 - r, r = ref - logp; row 0: t1 r = -0.5: e^-0.5 - 1 + 0.5 = 0.6065306597 - 0.5
    # = 0.1065306597; t2 r = 0: 0; t3 r = 1: e - 2 = 0.7182818285 (never negative, unlike k1's -1.0)
    rewards, kl = kl_penalized_rewards(SCORES, LOGPS, REF_LOGPS, MASK, 0.1, "k3")
    close(kl[0], [0.0, 0.1065306597, 0.0, 0.7182818285], atol=1e-9)
    close(rewards[0], [0.0, -0.01065306597, 0.0, 1.0 - 0.07182818285], atol=1e-9)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalized_rewards(SCORES, LOGPS, REF_LOGPS, MASK, 0.1, "k2")
    with pytest.raises(ValueError, match="response token"):
        kl_penalized_rewards(SCORES, LOGPS, REF_LOGPS, torch.tensor([[F, T, T, T], [F, F, F, F]]), 0.1)


# ---- GAE ---------------------------------------------------------------------------------------------------


def test_gae_issue_example():
    # values = rewards = [0, 0, 0, 1], gamma 0.9, lam 0.95 (gamma * lam = 0.855), V after the end = 0:
    #   t=3: delta = 1 + 0.9 * 0 - 1 = 0;        A = 0;                        R = 0 + 1 = 1.0
    #   t=2: delta = 0 + 0.9 * 1 - 0 = 0.9;      A = 0.9 + 0.855 * 0 = 0.9;    R = 0.9
    #   t=1: delta = 0 + 0.9 * 0 - 0 = 0;        A = 0.855 * 0.9 = 0.7695;     R = 0.7695
    #   t=0: delta = 0;                          A = 0.855 * 0.7695 = 0.6579225; R = 0.6579225
    # so the issue's [0.6579, 0.7695, 0.9, 1.0] holds with values equal to rewards.
    r = tensor([[0.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae(r, r.clone(), torch.ones(1, 4, dtype=torch.bool), gamma=0.9, lam=0.95)
    close(returns, [[0.6579225, 0.7695, 0.9, 1.0]])
    close(advantages, [[0.6579225, 0.7695, 0.9, 0.0]])


def test_gae_masked_positions_contribute_nothing():
    # response at t=1..2 of [prompt | r | r | pad]; junk 9s outside the mask; gamma 1, lam 0.95:
    #   t=2: delta = 2.0 + 0 - 0.5 = 1.5;          A = 1.5;                  R = 1.5 + 0.5 = 2.0
    #   t=1: delta = 0.5 + 0.5 - 1.0 = 0.0;        A = 0 + 0.95 * 1.5 = 1.425; R = 1.425 + 1.0 = 2.425
    r, v = tensor([[9.0, 0.5, 2.0, 9.0]]), tensor([[9.0, 1.0, 0.5, 9.0]])
    advantages, returns = gae(r, v, torch.tensor([[F, T, T, F]]), gamma=1.0, lam=0.95)
    close(advantages, [[0.0, 1.425, 1.5, 0.0]])
    close(returns, [[0.0, 2.425, 2.0, 0.0]])


def test_gae_bridges_a_hole_in_the_mask():
    # [T, F, T] equals the two-token response [1, 2] with values [0.5, 1], gamma 0.9, lam 0.5:
    #   last: delta = 2 - 1 = 1;                  A = 1;                    R = 2
    #   first: delta = 1 + 0.9 * 1 - 0.5 = 1.4;   A = 1.4 + 0.45 * 1 = 1.85; R = 2.35
    advantages, returns = gae(tensor([[1.0, 9.0, 2.0]]), tensor([[0.5, 9.0, 1.0]]), torch.tensor([[T, F, T]]),
                              gamma=0.9, lam=0.5)
    close(advantages, [[1.85, 0.0, 1.0]])
    close(returns, [[2.35, 0.0, 2.0]])


def test_gae_does_not_depend_on_where_the_response_sits():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g)
    a, ret = gae(r, v, torch.ones(1, 5, dtype=torch.bool), 0.99, 0.9)
    # the same response after a 3-token prompt and before 2 pad tokens, junk around it
    big_r, big_v = torch.randn(1, 10, generator=g), torch.randn(1, 10, generator=g)
    big_r[:, 3:8], big_v[:, 3:8] = r, v
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 3:8] = True
    big_a, big_ret = gae(big_r, big_v, mask, 0.99, 0.9)
    close(big_a[:, 3:8], a, atol=1e-6)
    close(big_ret[:, 3:8], ret, atol=1e-6)
    assert not big_a[~mask].any() and not big_ret[~mask].any()


# ---- KL controllers ----------------------------------------------------------------------------------------


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 12: error = clip(12 / 6 - 1 = 1, -0.2, 0.2) = 0.2; value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # KL 6.6: error = 0.1 (inside the clip); value *= 1 + 0.1 * 256 / 10000 = 1.00256
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.100512 * 1.00256, abs=1e-12)
    # KL 3: error = clip(-0.5) = -0.2; value *= 1 - 0.2 * 256 / 10000 = 0.99488
    ctl.update(torch.tensor(3.0), 256)
    expected = 0.100512 * 1.00256 * 0.99488
    assert ctl.value == pytest.approx(expected, abs=1e-12)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state == {"kind": "adaptive", "value": ctl.value, "target": 6.0, "horizon": 10_000.0}
    fresh = AdaptiveKLController(0.1, 6.0, 10_000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    with pytest.raises(ValueError, match="adaptive"):
        FixedKLController(0.1).load_state_dict(state)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    assert json.loads(json.dumps(ctl.state_dict())) == {"kind": "fixed", "value": 0.05}


# ---- policy loss -------------------------------------------------------------------------------------------

# clip 0.2 -> ratios clipped to [0.8, 1.2]; per token max(-A * r, -A * clip(r)):
#   row 0: r = 1.5, A = +1: max(-1.5, -1.2) = -1.2    clipped branch active (upper side)
#          r = 0.5, A = -2: max( 1.0,  1.6) =  1.6    clipped branch active (lower side)
#          r = 1.1, A = 0.5: max(-0.55, -0.55) = -0.55 inside the range
#   row 1: r = 0.5, A = +1: max(-0.5, -0.8) = -0.5    unclipped wins (pessimistic bound)
#          r = 1.5, A = -1: max( 1.5,  1.2) =  1.5    unclipped wins
#          r = 3.0, A = 10: masked, would add max(-30, -12) = -12
# sum = -1.2 + 1.6 - 0.55 - 0.5 + 1.5 = 0.85; clipfrac = 2 tokens; ratio sum = 1.5+0.5+1.1+0.5+1.5 = 5.1
# approx_kl = 0.5 * (2 ln(1.5)^2 + 2 ln(2)^2 + ln(1.1)^2)
#           = 0.5 * (2 * 0.1644019539 + 2 * 0.4804530139 + 0.0090840304) = 0.6493969830
# d loss / d logp = -A * r where the unclipped branch is taken, 0 where the clip is active or masked:
#   row 0: [0, 0, -0.55]; row 1: [-0.5, 1.5, 0]
RATIOS = tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 3.0]])
ADVANTAGES = tensor([[1.0, -2.0, 0.5], [1.0, -1.0, 10.0]])
LOSS_MASK = torch.tensor([[T, T, T], [T, T, F]])


def test_policy_loss_by_hand():
    old = tensor([[-1.0, -2.0, -0.3], [-0.7, -1.2, -2.5]])
    logps = (old + RATIOS.log()).requires_grad_()
    loss, metrics = policy_loss(logps, old, ADVANTAGES, LOSS_MASK, clip=0.2)
    close(loss.detach(), 0.85, atol=1e-9)
    close(metrics["clipfrac"], 2.0)
    close(metrics["ratio"], 5.1, atol=1e-9)
    close(metrics["approx_kl"], 0.6493969830, atol=1e-9)
    loss.backward()
    close(logps.grad, [[0.0, 0.0, -0.55], [-0.5, 1.5, 0.0]], atol=1e-9)


def test_policy_loss_ignores_anything_outside_the_mask():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = RATIOS.log().clone()
    logps[1, 2] = float("inf")  # junk where the mask is False
    loss, metrics = policy_loss(logps, old, ADVANTAGES, LOSS_MASK, clip=0.2)
    close(loss, 0.85, atol=1e-9)
    assert all(torch.isfinite(v) for v in metrics.values())


# ---- value loss --------------------------------------------------------------------------------------------

# clip 0.2: v_clipped = clamp(v, v_old - 0.2, v_old + 0.2); per token 0.5 * max((v - R)^2, (v_clipped - R)^2)
#   row 0: v 0.9, old 0.5, R 1.0: (-0.1)^2 = 0.01 vs (0.7 - 1)^2 = 0.09 -> 0.045  clipped larger (upper)
#          v 0.1, old 0.5, R 0.0: 0.01 vs (0.3 - 0)^2 = 0.09         -> 0.045    clipped larger (lower)
#          v 1.0, old 0.5, R 0.0: 1.0 vs (0.7)^2 = 0.49              -> 0.5      unclipped larger
#   row 1: v 0.6, old 0.5, R 1.0: inside the range, 0.16 both        -> 0.08     tie, not counted
#          v -1.0, old 0.0, R -1.0: 0 vs (-0.2 + 1)^2 = 0.64         -> 0.32     clipped larger
#          v 100, old 0, R 0: masked (would add 5000)
# sum = 0.045 + 0.045 + 0.5 + 0.08 + 0.32 = 0.99; vf_clipfrac = 3 tokens
VALUES = tensor([[0.9, 0.1, 1.0], [0.6, -1.0, 100.0]])
OLD_VALUES = tensor([[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]])
RETURNS = tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 0.0]])


def test_value_loss_by_hand():
    values = VALUES.clone().requires_grad_()
    loss, metrics = value_loss(values, OLD_VALUES, RETURNS, LOSS_MASK, clip=0.2)
    close(loss.detach(), 0.99, atol=1e-9)
    close(metrics["vf_clipfrac"], 3.0)
    loss.backward()
    # gradient (v - R) where the unclipped branch wins, 0 where the clipped one does or masked
    close(values.grad, [[0.0, 0.0, 1.0], [-0.4, 0.0, 0.0]], atol=1e-9)
    # no clip: 0.5 * (0.01 + 0.01 + 1 + 0.16 + 0) = 0.59
    close(value_loss(VALUES, OLD_VALUES, RETURNS, LOSS_MASK, clip=None)[0], 0.59, atol=1e-9)


# ---- entropy -----------------------------------------------------------------------------------------------


def test_entropy_from_logits():
    # [0, 0]: ln 2; [0, ln 3]: p = (1/4, 3/4), H = 1/4 ln 4 + 3/4 ln(4/3) = 0.5623351446;
    # [1000, 1000]: ln 2 (no overflow); [0, -inf]: 0 (no NaN); [5, 5, 5, 5]: ln 4
    logits = tensor([[[0.0, 0.0, -math.inf, -math.inf], [0.0, math.log(3), -math.inf, -math.inf]],
                     [[1000.0, 1000.0, -math.inf, -math.inf], [0.0, -math.inf, -math.inf, -math.inf]]])
    close(entropy_from_logits(logits), [[math.log(2), 0.5623351446], [math.log(2), 0.0]], atol=1e-9)
    close(entropy_from_logits(torch.full((1, 1, 4), 5.0)), [[math.log(4)]], atol=1e-6)
    g = torch.Generator().manual_seed(0)
    random = torch.randn(2, 3, 7, generator=g)
    close(entropy_from_logits(random), torch.distributions.Categorical(logits=random).entropy(), atol=1e-6)


# ---- Rollout -----------------------------------------------------------------------------------------------


def make_rollout(b=5, t=4):
    ids = torch.arange(b * t).view(b, t)
    per_token = ids.double()
    return Rollout(sequences=ids, attention_mask=torch.ones(b, t, dtype=torch.bool),
                   response_mask=torch.ones(b, t, dtype=torch.bool), logps=per_token, ref_logps=per_token + 1,
                   values=per_token + 2, scores=torch.arange(b).double(), advantages=per_token + 3)


def test_rollout_minibatches_cover_every_row_once_and_keep_fields_aligned():
    rollout = make_rollout()
    batches = list(rollout.minibatches(2, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 2, 1]
    rows = torch.cat([b.scores for b in batches]).long()
    assert sorted(rows.tolist()) == list(range(5)) and rows.tolist() != list(range(5))
    for b in batches:
        row = b.scores.long()
        assert torch.equal(b.sequences, rollout.sequences[row])
        assert torch.equal(b.values, rollout.values[row]) and torch.equal(b.advantages, rollout.advantages[row])
        assert b.rewards is None and b.returns is None
    again = [b.scores.tolist() for b in rollout.minibatches(2, torch.Generator().manual_seed(0))]
    assert again == [b.scores.tolist() for b in batches]
    assert [b.scores.tolist() for b in rollout.minibatches(2)] == [[0.0, 1.0], [2.0, 3.0], [4.0]]


def test_rollout_to_moves_tensors_and_keeps_missing_fields():
    moved = make_rollout().to("cpu")
    assert moved.sequences.device.type == "cpu" and moved.returns is None
    assert torch.equal(moved.logps, make_rollout().logps)


def test_loss_metrics_count_exactly_in_bf16():
    # 600 tokens all clipped (ratio 2, A = 1): bf16 cannot hold 599 or 601, so counts accumulate in fp32
    n = 600
    ones = torch.ones(1, n, dtype=torch.bfloat16)
    mask = torch.ones(1, n, dtype=torch.bool)
    _, metrics = policy_loss(ones * math.log(2), ones * 0, ones, mask, clip=0.2)
    assert metrics["clipfrac"].dtype == torch.float32 and float(metrics["clipfrac"]) == n
    _, metrics = value_loss(ones * 0.9, ones * 0.5, ones, mask, clip=0.2)
    assert float(metrics["vf_clipfrac"]) == n
