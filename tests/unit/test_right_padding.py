"""Right-padded rows need no attention mask under a causal model (``causal_only``), and a PPO minibatch
drops the padding columns after its longest row (``Rollout.trimmed``): both change no number at a real
position."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.models.inference import causal_only
from align.rl.rollout import Rollout


def test_causal_only_drops_the_mask_of_right_padded_rows_only():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert causal_only(right) is None
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert causal_only(left) is left
    holes = torch.tensor([[1, 0, 1, 0]])
    assert causal_only(holes) is holes
    assert causal_only(None) is None


def test_no_mask_gives_the_same_outputs_at_real_positions():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 40, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    with torch.no_grad():
        masked = lm(input_ids=ids, attention_mask=mask).logits
        plain = lm(input_ids=ids, attention_mask=causal_only(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(plain[real], masked[real], atol=1e-5, rtol=1e-5)


def test_trimmed_cuts_the_columns_after_the_longest_row():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    per_token = torch.arange(10, dtype=torch.float32).reshape(2, 5) * mask
    r = Rollout(sequences=torch.arange(10).reshape(2, 5), attention_mask=mask, response_mask=mask,
                logps=per_token, ref_logps=per_token, values=per_token, scores=torch.tensor([1.0, 2.0]),
                advantages=per_token)
    t = r.trimmed()
    assert t.sequences.tolist() == [[0, 1, 2], [5, 6, 7]]
    assert t.advantages.shape == (2, 3) and t.scores.tolist() == [1.0, 2.0]
    assert t.num_tokens == r.num_tokens == 5
    assert r.select(torch.tensor([1])).trimmed().sequences.tolist() == [[5, 6]]
