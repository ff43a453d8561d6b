"""Reward model scoring is exact: a packed row (prompt once + several responses, several prompts per
batch) gives the scores of one row per (prompt + response), and those equal plain transformers'
sequence-classification scores of the saved checkpoint."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from align.config.specs import LoraConfig, ModelSpec, TinyModelConfig
from align.data.chat import build_byte_tokenizer
from align.data.ranking import collate_ranked, tokenize_ranked
from align.models.reward import PackedRewards, ensure_distinct_pad, load_reward_model, load_reward_tokenizer
from data_schemas import parse_record
from rewards.scoring import RewardScorer

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
RECORDS = [
    {"prompt": [{"role": "user", "content": "What is 3 plus 4?"}],
     "responses": ["3 plus 4 is 7.", "It is 8.", "I do not know, sorry."]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Reverse the word cat."}],
     "chosen": [{"role": "assistant", "content": "tac"}], "rejected": [{"role": "assistant", "content": "cat"}]},
]


def tiny_rm(attn="sdpa", lora=None):
    spec = ModelSpec(path="builtin:tiny", tiny=TINY, attn_implementation=attn, lora=lora)
    tok = load_reward_tokenizer(spec, "builtin:tiny")
    model = load_reward_model(spec, "builtin:tiny", tok, seed=0)
    with torch.no_grad():  # a head that is not ~0 so differences show
        for p in model.parameters():
            if p.ndim == 2 and p.shape[0] == 1:
                p.normal_(0, 1.0)
    return model.eval(), tok


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scores_equal_separate_rows(attn):
    model, tok = tiny_rm(attn)
    records = [parse_record(r, "preference") for r in RECORDS]
    examples = [tokenize_ranked(tok, r, 72, None, "none") for r in records]  # cuts record 2's prompt to 36
    batch = collate_ranked(examples, tok.pad_token_id)
    with torch.no_grad():
        packed = PackedRewards(model)(*batch.model_inputs())
    assert packed.shape == (5,)
    scorer = RewardScorer(model, tok, max_length=72)  # same truncation rule, one response at a time
    separate = []
    for r in records:
        for resp in r.responses:
            ids = scorer.encode(r.prompt, resp)
            with torch.no_grad():
                separate.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    torch.testing.assert_close(packed, torch.tensor(separate), atol=1e-5, rtol=1e-5)
    # batched, right-padded plain-transformers scoring agrees too
    batched = scorer.score([r.prompt for r in records for _ in r.responses],
                           [x for r in records for x in r.responses], batch_size=3)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(separate), atol=1e-5, rtol=1e-5)


def test_saved_checkpoint_is_a_plain_seq_cls_model(tmp_path):
    model, tok = tiny_rm()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tok.pad_token_id
    record = parse_record(RECORDS[0], "preference")
    ids = RewardScorer(model, tok).encode(record.prompt, record.responses[0])
    with torch.no_grad():
        ours = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert RewardScorer.from_pretrained(tmp_path, device="cpu").score_ids([ids]) == pytest.approx([ours], abs=1e-6)
    assert tok.pad_token_id not in ids


def test_lora_keeps_head_trainable():
    model, _ = tiny_rm(lora=LoraConfig(r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_pad_token_is_made_distinct():
    tok = build_byte_tokenizer()
    tok.pad_token = "<|eot_id|>"  # a common setup (pad = eos) that would hide the scored token
    assert ensure_distinct_pad(tok).pad_token == "<|finetune_right_pad_id|>"


def test_loads_from_a_causal_lm_checkpoint(tmp_path):
    """A causal LM folder (e.g. the SFT output) becomes a reward model: same backbone, new head, pad id."""
    from align.models.loading import build_tiny_model

    lm = build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), 262, seed=1)
    lm.save_pretrained(tmp_path)
    build_byte_tokenizer().save_pretrained(tmp_path)
    spec = ModelSpec(path=str(tmp_path))
    tok = load_reward_tokenizer(spec, str(tmp_path))
    rm = load_reward_model(spec, str(tmp_path), tok, seed=0)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(rm.model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight)
    assert rm.score.weight.shape == (1, TINY.hidden_size) and rm.score.weight.abs().sum() > 0
