"""Preference tokenization: the DPO mask removes exactly the formatting tokens; pairs; truncation;
the stage's loss keeps the termination token in the NLL."""

import pytest
import torch

from align.data.builtin import chat_preference_records
from align.data.chat import EOT, build_byte_tokenizer, formatting_token_ids
from align.data.preference import (
    collate_pairs,
    select_pairs,
    tokenize_preference,
    tokenize_preferences,
)
from align.train.dpo import make_loss_fn
from data_schemas import parse_record
from tests.conftest import fixed_logps_module

RECORD = parse_record({
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    "responses": ["4", "  five  ", "22"],
}, "preference")


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def toks(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_mask_removes_exactly_the_termination_token(tok):
    ex, fallbacks, _ = tokenize_preference(tok, RECORD, formatting_token_ids(tok), 512, "adjacent")
    assert fallbacks == 0
    assert tok.decode(ex.prompt_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for ids, mask, content in zip(ex.responses, ex.dpo_masks, ["4", "five", "22"], strict=True):
        assert ids == toks(tok, content + EOT)  # content (trimmed by the template) + termination token
        assert mask == [True] * len(content) + [False]
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == content  # kept: exactly the content


def test_content_token_with_a_formatting_id_is_not_masked(tok):
    # the content itself contains the special token: positional masking keeps it, only the template's goes
    record = parse_record({"prompt": "Say the stop token.", "chosen": f"It is {EOT} ok", "rejected": "No"},
                          "preference")
    ex, *_ = tokenize_preference(tok, record, formatting_token_ids(tok), 512, "best_worst")
    eot = tok.convert_tokens_to_ids(EOT)
    chosen, mask = ex.responses[0], ex.dpo_masks[0]
    assert chosen.count(eot) == 2
    assert [m for i, m in zip(chosen, mask, strict=True) if i == eot] == [True, False]  # content eot kept, final one masked


def test_explicit_list_and_off(tok):
    explicit, *_ = tokenize_preference(tok, RECORD, formatting_token_ids(tok, [EOT]), 512, "best_worst")
    assert explicit.dpo_masks == [[True, False], [True, True, False]]
    off, *_ = tokenize_preference(tok, RECORD, frozenset(), 512, "best_worst")
    assert off.dpo_masks == [[True, True], [True, True, True]]


def test_pairs_modes(tok):
    assert select_pairs(3, "best_worst") == ([0, 2], [(0, 1)])
    assert select_pairs(3, "adjacent") == ([0, 1, 2], [(0, 1), (1, 2)])
    assert select_pairs(2, "adjacent") == ([0, 1], [(0, 1)])
    best_worst, *_ = tokenize_preference(tok, RECORD, frozenset(), 512, "best_worst")
    assert [tok.decode(r) for r in best_worst.responses] == [f"4{EOT}", f"22{EOT}"]


def test_truncation_and_dropped_prompts(tok):
    ex, *_ = tokenize_preference(tok, RECORD, formatting_token_ids(tok), 1000, "best_worst")
    p = len(ex.prompt_ids)
    cut, *_ = tokenize_preference(tok, RECORD, formatting_token_ids(tok), p + 1, "best_worst")
    assert cut.responses == [toks(tok, "4"), toks(tok, "2")]
    data = tokenize_preferences(tok, [RECORD, RECORD], formatting_token_ids(tok), p, "best_worst")
    assert data.examples == [] and data.dropped == 2


def test_truncated_responses_are_counted(tok):
    p = len(tokenize_preference(tok, RECORD, frozenset(), 1000, "adjacent")[0].prompt_ids)
    assert tokenize_preferences(tok, [RECORD], frozenset(), 1000, "adjacent").truncated == 0
    # room for 2 response tokens: "4<eot>" fits, "five<eot>" and "22<eot>" are cut
    data = tokenize_preferences(tok, [RECORD, RECORD], frozenset(), p + 2, "adjacent")
    assert data.truncated == 4 and data.dropped == 0


def pref(responses):
    return parse_record({"prompt": "q?", "responses": responses}, "preference")


def test_identical_pairs_are_dropped_and_counted(tok):
    records = [
        pref(["same", "  same "]),  # identical once the template trims the content: the record goes
        pref(["good", "bad"]),
        pref(["a", "b", "b", "c"]),  # ranked: only the (b, b) pair goes
        pref(["x", "y", "x"]),  # best_worst: (x, x)
    ]
    data = tokenize_preferences(tok, records, frozenset(), 512, "adjacent")
    assert data.identical_pairs == 2 and data.identical_records == 1 and data.dropped == 0
    assert len(data.examples) == 3 and data.num_pairs == 1 + 2 + 2
    ranked = data.examples[1]
    assert [tok.decode(r) for r in ranked.responses] == [f"{c}{EOT}" for c in "abbc"]
    assert ranked.pairs == [(0, 1), (2, 3)]
    data = tokenize_preferences(tok, records, frozenset(), 512, "best_worst")
    assert data.identical_pairs == 2 and data.identical_records == 2
    assert [[tok.decode(r) for r in ex.responses] for ex in data.examples] == [[f"good{EOT}", f"bad{EOT}"],
                                                                               [f"a{EOT}", f"c{EOT}"]]


def test_pairs_identical_after_truncation_are_dropped(tok):
    record = pref(["abc one", "abc two"])
    p = len(tokenize_preference(tok, record, frozenset(), 1000, "best_worst")[0].prompt_ids)
    data = tokenize_preferences(tok, [record], frozenset(), p + 3, "best_worst")
    assert data.examples == [] and data.identical_pairs == 1 and data.truncated == 2


def test_chat_preference_records_are_valid_and_ranked():
    records = chat_preference_records(5, seed=1)
    assert len(records) == 5 and all(len(r.responses) == 3 for r in records)
    assert all(r.responses[0].content != r.responses[2].content for r in records)




def test_stage_loss_keeps_termination_token_in_nll(tok):
    ex, *_ = tokenize_preference(tok, RECORD, formatting_token_ids(tok), 512, "best_worst")  # "4<eot>" vs "22<eot>"
    batch = collate_pairs([ex], tok.pad_token_id, ref_logps=[[0.0, 0.0]])
    values = torch.tensor([-1.0, -3.0, -0.5, -0.5, -2.0])  # chosen: 4, eot; rejected: 2, 2, eot
    loss, m = make_loss_fn(beta=1.0, nll_weight=1.0, label_smoothing=0.0)(fixed_logps_module(values), batch)
    assert m["nll"].item() == pytest.approx((1.0 + 3.0) / 2)  # termination token in the NLL
    assert m["logps/chosen"].item() == pytest.approx(-1.0)  # ... but not in the DPO sum
    assert m["logps/rejected"].item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item() + 2.0)
