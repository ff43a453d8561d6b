"""DPO loss against numbers worked out by hand, with and without masking and the NLL term."""

import math

import pytest
import torch

from align.losses.dpo import dpo_loss, response_sums, response_token_counts


def neg_logsigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# two responses of one pair, token log-probs; the last token of each is its <|eot_id|>
CHOSEN = [-1.0, -2.0, -0.5]
REJECTED = [-3.0, -0.25]
TOKENS = torch.tensor(CHOSEN + REJECTED)  # (N,)
OWNER = torch.tensor([0, 0, 0, 1, 1])  # (N,) response of each token
DPO_MASK = torch.tensor([True, True, False, True, False])  # eot left out
REF_C, REF_R = -4.0, -2.0


def test_response_sums_and_counts():
    assert response_sums(TOKENS, OWNER, 2).tolist() == [-3.5, -3.25]
    assert response_sums(TOKENS, OWNER, 2, DPO_MASK).tolist() == [-3.0, -3.0]
    assert response_token_counts(OWNER, 2).tolist() == [3.0, 2.0]


def test_plain_dpo_by_hand():
    # h = (-5 - -6) - (-7 - -6.5) = 1 + 0.5 = 1.5; beta h = 0.15
    loss, m = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5]),
                       beta=0.1, nll_weight=0.0)
    assert loss.item() == pytest.approx(neg_logsigmoid(0.15), abs=1e-6)
    assert loss.item() == pytest.approx(0.6209571, abs=1e-6)  # ln(1 + e^-0.15)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.05)
    assert m["rewards/margin"].item() == pytest.approx(0.15)
    assert m["rewards/accuracy"].item() == 1.0
    assert "nll" not in m


def test_masked_sums_and_nll_with_termination_token():
    sums = response_sums(TOKENS, OWNER, 2, DPO_MASK)  # [-3, -3]: eot out of both sums
    nll = -response_sums(TOKENS, OWNER, 2) / response_token_counts(OWNER, 2)  # chosen: 3.5 / 3 (eot in)
    loss, m = dpo_loss(sums[:1], sums[1:], torch.tensor([REF_C]), torch.tensor([REF_R]), nll[:1],
                       beta=0.1, nll_weight=0.2)
    # h = (-3 - -4) - (-3 - -2) = 1 - (-1) = 2; beta h = 0.2; NLL = (1 + 2 + 0.5) / 3
    want = neg_logsigmoid(0.2) + 0.2 * (3.5 / 3)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["nll"].item() == pytest.approx(3.5 / 3)
    assert m["dpo"].item() == pytest.approx(neg_logsigmoid(0.2), abs=1e-6)


def test_without_masking_the_eot_counts():
    sums = response_sums(TOKENS, OWNER, 2)  # [-3.5, -3.25]
    loss, _ = dpo_loss(sums[:1], sums[1:], torch.tensor([REF_C]), torch.tensor([REF_R]), beta=0.1, nll_weight=0.0)
    # h = (-3.5 - -4) - (-3.25 - -2) = 0.5 + 1.25 = 1.75
    assert loss.item() == pytest.approx(neg_logsigmoid(0.175), abs=1e-6)


def test_label_smoothing_and_sum_over_pairs():
    pc, pr = torch.tensor([-5.0, -1.0]), torch.tensor([-7.0, -1.0])
    rc, rr = torch.tensor([-6.0, -2.0]), torch.tensor([-6.5, 0.0])
    # pair 1: beta h = 0.15; pair 2: h = (1) - (-1) = 2 -> 0.2
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.0, label_smoothing=0.1)
    want = sum(0.9 * neg_logsigmoid(x) + 0.1 * neg_logsigmoid(-x) for x in (0.15, 0.2))
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["rewards/accuracy"].item() == 2.0  # a sum: the loop divides by the pair count


def test_nll_weight_needs_nll():
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(*[torch.zeros(1)] * 4, nll_weight=0.2)


def test_gradient_flows_to_policy_only():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-7.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-6.0]), torch.tensor([-6.5]), beta=0.1, nll_weight=0.0)
    loss.backward()
    s = 1 / (1 + math.exp(0.15))  # d/dh of -log sigmoid(beta h) = -beta sigmoid(-beta h)
    assert pc.grad.item() == pytest.approx(-0.1 * s, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.1 * s, abs=1e-6)
