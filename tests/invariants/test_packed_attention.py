"""Packed SFT rows attend within each sequence: the per-sequence SDPA (``align.models.packed_attention``)
gives the log-probs of one row per example, and it is the path that runs (one causal SDPA call per
sequence and layer) instead of transformers' block-diagonal mask."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.data.chat import TokenizedChat
from align.data.collate import collate_packed
from align.models.logps import TokenLogps
from align.models.packed_attention import segment_bounds

EXAMPLES = [[1, 5, 6, 7, 8, 2], [1, 9, 2], [1, 4, 4, 11, 12, 13, 2], [1, 3, 2, 2]]


def tiny_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def chat(ids):
    return TokenizedChat(input_ids=ids, loss_mask=[False] + [True] * (len(ids) - 1))


def test_segment_bounds():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_bounds(positions) == [[0, 3, 5, 6], [0, 6]]


def test_packed_rows_give_the_log_probs_of_separate_rows(monkeypatch):
    lm = tiny_lm()
    batch = collate_packed([chat(x) for x in EXAMPLES], row_length=12, pad_id=0)
    assert batch.input_ids.shape[0] == 2  # two rows of several examples (and a pad tail)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(kw.get("is_causal", False))
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = TokenLogps(lm)
    logps = model(*batch.model_inputs())
    logps.sum().backward()  # the per-sequence path has a backward
    sequences = sum(len(b) - 1 for b in segment_bounds(batch.position_ids))
    assert calls == [True] * (2 * sequences)  # per layer, one causal call per sequence; no masked call
    monkeypatch.undo()
    for k, ids in enumerate(EXAMPLES):
        with torch.no_grad():
            want = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1], -1).gather(
                -1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(logps[batch.example_ids == k].detach(), want, atol=1e-5, rtol=1e-5)
