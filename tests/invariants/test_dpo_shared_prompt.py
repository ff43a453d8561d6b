"""DPO's shared-prompt rows are exact: per-response masked log-prob sums and token-mean NLLs equal those
of one padded row per (prompt + response) scored with full logits (fp32, 1e-5)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.data.builtin import chat_preference_records
from align.data.chat import build_byte_tokenizer, formatting_token_ids
from align.data.preference import collate_pairs, tokenize_preferences
from align.losses.dpo import response_sums, response_token_counts
from align.models.logps import TokenLogps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_prompt_rows_equal_separate_rows():
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = LlamaForCausalLM(cfg).eval()
    examples = tokenize_preferences(tok, chat_preference_records(4, seed=3), formatting_token_ids(tok), 256,
                                    "adjacent").examples
    batch = collate_pairs(examples, tok.pad_token_id)
    with torch.no_grad():
        logps = TokenLogps(lm)(*batch.model_inputs())  # (N,)
    owner, r = batch.tokens.owner, batch.num_responses
    got_masked = response_sums(logps, owner, r, batch.dpo_mask)
    got_nll = -response_sums(logps, owner, r) / response_token_counts(owner, r)

    seqs = [(ex.prompt_ids, resp, mask) for ex in examples for resp, mask in zip(ex.responses, ex.dpo_masks, strict=True)]
    assert len(seqs) == r == 12
    width = max(len(p) + len(s) for p, s, _ in seqs)
    ids = torch.full((r, width), tok.pad_token_id)
    attn = torch.zeros((r, width), dtype=torch.long)
    for i, (p, s, _) in enumerate(seqs):
        ids[i, : len(p) + len(s)] = torch.tensor(p + s)
        attn[i, : len(p) + len(s)] = 1
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)  # (R, T, V)
    for i, (p, s, mask) in enumerate(seqs):
        token_logps = torch.stack([full[i, len(p) - 1 + j, t] for j, t in enumerate(s)])
        want_masked = token_logps[torch.tensor(mask)].sum()
        torch.testing.assert_close(got_masked[i], want_masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_nll[i], -token_logps.mean(), atol=1e-5, rtol=1e-5)
    # pairs point at the right responses: adjacent pairs of 3 ranked responses per record
    assert batch.chosen.tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert batch.rejected.tolist() == [1, 2, 4, 5, 7, 8, 10, 11]
