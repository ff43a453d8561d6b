"""The shared-prompt row is exact: per-token log-probs and last-token hidden states equal those of
one row per (prompt + response)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.data.shared_prompt import build_row, collate_shared
from align.models.logps import TokenLogps, decoder_and_head


def tiny_lm(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[1, 5, 6, 7], [1, 9, 8]]
RESPONSES = [[[10, 11, 12, 2], [13, 2], [14, 15, 16, 17, 2]], [[20, 21, 2], [22, 23, 24, 2]]]


def separate(lm, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = lm(ids).logits[0].float().log_softmax(-1)
        hidden = decoder_and_head(lm)[0](input_ids=ids).last_hidden_state[0, -1]
    p = len(prompt)
    logps = torch.stack([logits[p - 1 + j, tok] for j, tok in enumerate(response)])
    return logps, hidden


# a third, short record: with first-fit packing it shares the row of the second (15 = 10 + 5 tokens)
PROMPTS.append([1, 3])
RESPONSES.append([[30, 2], [31]])


@pytest.mark.parametrize("pack", [True, False])
def test_packed_equals_separate_rows(pack):
    for attn in ("sdpa", "eager"):
        lm = tiny_lm(attn)
        rows = [build_row(p, rs) for p, rs in zip(PROMPTS, RESPONSES, strict=True)]
        batch = collate_shared(rows, pad_id=0, pack=pack)
        assert batch.input_ids.shape[0] == (2 if pack else 3)
        with torch.no_grad():
            logps = TokenLogps(lm)(*batch.model_inputs())
            hidden = decoder_and_head(lm)[0](
                input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask
            ).last_hidden_state
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])[batch.last_index]
        r = 0
        for prompt, responses in zip(PROMPTS, RESPONSES, strict=True):
            for resp in responses:
                want_logps, want_hidden = separate(lm, prompt, resp)
                got = logps[batch.owner == r]
                torch.testing.assert_close(got, want_logps, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(flat_hidden[r], want_hidden, atol=1e-5, rtol=1e-5)
                r += 1
        assert r == batch.last_index.numel() == 7
