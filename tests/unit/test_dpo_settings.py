"""DPO settings change the stage's loss: beta, nll_weight, label_smoothing and the formatting-token mask,
each checked through ``align.train.dpo.make_loss_fn`` on a batch whose per-token log-probs are fixed, so
every expected number is worked out by hand.

The batch: prompt + "4<eot>" (chosen) and "22<eot>" (rejected), tokens of the byte tokenizer.
Per-token log-probs: chosen 4: -1.0, eot: -3.0; rejected 2: -0.5, 2: -0.5, eot: -2.0.
Reference sums (what the stage caches, mask applied): chosen -2.0, rejected -0.5.

    masked sums (eot out):    pc = -1,  pr = -1     h = (-1 + 2) - (-1 + 0.5) = 1.5
    unmasked sums (eot in):   pc = -4,  pr = -3     h = (-4 + 2) - (-3 + 0.5) = 0.5
    NLL(chosen) = (1 + 3) / 2 = 2.0   (termination token always in)
"""

import math

import pytest
import torch

from align.data.chat import EOT, START_HEADER, build_byte_tokenizer, formatting_token_ids
from align.data.preference import collate_pairs, tokenize_preference
from align.train.dpo import make_loss_fn
from data_schemas import parse_record
from tests.conftest import fixed_logps_module

RECORD = parse_record({"prompt": "2+2?", "responses": ["4", "five", "22"]}, "preference")
VALUES = torch.tensor([-1.0, -3.0, -0.5, -0.5, -2.0])
REF = [[-2.0, -0.5]]
H_MASKED, H_UNMASKED, NLL = 1.5, 0.5, 2.0


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def pref_term(beta: float, h: float, eps: float) -> float:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)




@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def batch_with(tok, formatting_ids):
    ex, *_ = tokenize_preference(tok, RECORD, formatting_ids, 512, "best_worst")
    assert [tok.decode(r) for r in ex.responses] == [f"4{EOT}", f"22{EOT}"]
    return collate_pairs([ex], tok.pad_token_id, ref_logps=REF)


@pytest.mark.parametrize("beta,nll_weight,eps", [(0.1, 0.0, 0.0), (0.4, 0.3, 0.2), (2.0, 1.0, 0.1), (1.0, 0.2, 0.0)])
def test_loss_by_hand_for_each_setting(tok, beta, nll_weight, eps):
    batch = batch_with(tok, formatting_token_ids(tok))
    loss, m = make_loss_fn(beta=beta, nll_weight=nll_weight, label_smoothing=eps)(fixed_logps_module(VALUES), batch)
    want = pref_term(beta, H_MASKED, eps) + nll_weight * NLL
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["dpo"].item() == pytest.approx(pref_term(beta, H_MASKED, eps), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(beta * 1.0, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(beta * -0.5, abs=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(beta * H_MASKED, abs=1e-6)
    assert m["nll"].item() == pytest.approx(NLL, abs=1e-6)


def test_each_setting_moves_the_loss(tok):
    """One setting at a time away from (beta 0.1, nll 0.2, eps 0): the loss moves by the hand-computed amount."""
    batch = batch_with(tok, formatting_token_ids(tok))

    def loss(**kw):
        args = {"beta": 0.1, "nll_weight": 0.2, "label_smoothing": 0.0, **kw}
        return make_loss_fn(**args)(fixed_logps_module(VALUES), batch)[0].item()

    base = loss()
    assert base == pytest.approx(softplus(-0.15) + 0.4, abs=1e-6)
    assert loss(beta=3.0) - base == pytest.approx(softplus(-4.5) - softplus(-0.15), abs=1e-6)
    assert loss(nll_weight=0.7) - base == pytest.approx(0.5 * NLL, abs=1e-6)
    assert loss(label_smoothing=0.3) - base == pytest.approx(0.3 * (softplus(0.15) - softplus(-0.15)), abs=1e-6)


def test_formatting_mask_keeps_termination_token_out_of_dpo_sums(tok):
    """auto and an explicit [<|eot_id|>] leave the eot out of the DPO sums; off (or a list naming a token the
    responses do not carry) puts it in: h is 1.5 vs 0.5. The NLL keeps the eot either way."""
    fn = make_loss_fn(beta=1.0, nll_weight=0.0, label_smoothing=0.0)
    cases = {
        "auto": (formatting_token_ids(tok), H_MASKED, -1.0, -1.0),
        "list_eot": (formatting_token_ids(tok, [EOT]), H_MASKED, -1.0, -1.0),
        "list_header": (formatting_token_ids(tok, [START_HEADER]), H_UNMASKED, -4.0, -3.0),
        "off": (frozenset(), H_UNMASKED, -4.0, -3.0),
    }
    for name, (ids, h, chosen, rejected) in cases.items():
        loss, m = fn(fixed_logps_module(VALUES), batch_with(tok, ids))
        assert m["logps/chosen"].item() == pytest.approx(chosen), name
        assert m["logps/rejected"].item() == pytest.approx(rejected), name
        assert loss.item() == pytest.approx(softplus(-h), abs=1e-6), name
        assert m["rewards/margin"].item() == pytest.approx(h, abs=1e-6), name
        assert m["nll"].item() == pytest.approx(NLL), name
