"""The last decoder layer run at the read positions only (align.models.last_layer) gives the full
layer's hidden states, log-probs, rewards and gradients there: packed rows, padded rows, custom 4D
masks, SDPA and eager, GQA, LoRA."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from align.compat import enable_activation_checkpointing
from align.models.last_layer import hidden_at, prunable
from align.models.logps import TokenLogps
from align.models.reward import PackedRewards


def _config(attn="sdpa", kv=2):
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                      pad_token_id=0)
    cfg._attn_implementation = attn
    return cfg


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(model, run):
    """run(prune) -> scalar-able tensor, for the pruned and the full last layer: values and gradients."""
    out = {}
    for prune in (True, False):
        model.zero_grad()
        y = run(prune)
        y.square().sum().backward()
        out[prune] = (y.detach(), _grads(model))
    return out


def _assert_same(out):
    (y1, g1), (y0, g0) = out[True], out[False]
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g0.keys() and len(g1) > 0
    for n in g0:
        # SDPA: equal to the bit here; eager: its softmax vs SDPA's kernel, about 1e-4 relative
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3, msg=n)


def _packed_inputs(T=20):
    torch.manual_seed(1)
    ids = torch.randint(1, 61, (2, T))
    # row 0: sequences of 7, 9, 4 tokens; row 1: 12 then 8
    pos = torch.cat([torch.arange(7), torch.arange(9), torch.arange(4)]).view(1, T)
    pos = torch.cat([pos, torch.cat([torch.arange(12), torch.arange(8)]).view(1, T)])
    return ids, pos


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_packed_rows_give_the_full_layers_logps_and_gradients(attn, kv):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config(attn, kv))
    assert prunable(lm.model)
    ids, pos = _packed_inputs()
    # rows differ in counts; position 9 is read twice (as DPO reads a shared prompt's last token)
    index = torch.tensor([2, 3, 4, 9, 10, 14, 18, 9, 21, 22, 23, 30, 35, 39])
    targets = ids.view(-1)[(index + 1) % 40]
    model = TokenLogps(lm)

    def run(prune):
        model.prune_last_layer = prune
        return model(ids, pos, None, index, targets)

    _assert_same(_both(model, run))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_rows_and_4d_masks(attn):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config(attn))
    ids = torch.randint(1, 61, (3, 10))
    pad = torch.ones(3, 10, dtype=torch.long)
    pad[0, 7:] = 0
    pad[2, :3] = 0  # left padding too
    index = torch.tensor([1, 5, 6, 12, 19, 25, 29])  # row 1 has 2, row 0 has 3, row 2 has 2
    custom = torch.ones(3, 1, 10, 10).tril().bool()
    custom[:, :, 6:, 2:5] = False  # a shared-prompt-like block: later tokens skip a middle span
    if attn == "eager":  # eager takes a custom mask additive (a boolean one is added as numbers)
        custom = torch.zeros(custom.shape).masked_fill(~custom, torch.finfo(torch.float32).min)
    for mask in (pad, custom, None):

        def run(prune, mask=mask):
            return hidden_at(lm.model, index, prune=prune, input_ids=ids, attention_mask=mask)

        _assert_same(_both(lm, run))


def test_reward_model_scores_at_last_tokens():
    torch.manual_seed(0)
    cfg = _config()
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg)
    ids, pos = _packed_inputs()
    last = torch.tensor([6, 15, 19, 31, 39])
    model = PackedRewards(rm)

    def run(prune):
        model.prune_last_layer = prune
        return model(ids, pos, None, last)

    _assert_same(_both(model, run))


def test_lora_and_a_row_without_read_positions():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lm = peft.get_peft_model(LlamaForCausalLM(_config()), peft.LoraConfig(r=4, target_modules="all-linear"))
    for p in lm.parameters():  # non-zero B so the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ids, pos = _packed_inputs()
    index = torch.tensor([3, 4, 5, 6])  # row 1 reads nothing
    decoder = lm.get_base_model().model
    assert prunable(decoder)

    def run(prune):
        return hidden_at(decoder, index, prune=prune, input_ids=ids, position_ids=pos)

    _assert_same(_both(lm, run))


def test_the_pruned_path_runs_and_is_undone():
    """The last layer's MLP sees only the read positions, and the layer is whole again afterwards."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config())
    seen = []
    hook = lm.model.layers[-1].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    ids, pos = _packed_inputs()
    hidden_at(lm.model, torch.tensor([1, 2, 30]), input_ids=ids, position_ids=pos)
    assert seen == [3]
    assert "forward" not in vars(lm.model.layers[-1])
    lm.model(input_ids=ids, position_ids=pos)
    assert seen[-1] == 40
    hook.remove()


def test_activation_checkpointing_runs_the_layer_whole():
    """A checkpointed layer recomputes its forward during backward, after the pruned call is over: the
    recomputation would not match, so such a layer runs whole (and backward works)."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config())
    enable_activation_checkpointing(lm)
    lm.train()
    seen = []
    hook = lm.model.layers[-1].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    ids, pos = _packed_inputs()
    index = torch.tensor([1, 2, 30])
    hidden_at(lm.model, index, input_ids=ids, position_ids=pos).square().sum().backward()
    assert seen and set(seen) == {40}
    hook.remove()


def test_other_attention_kernels_run_the_layer_whole():
    lm = LlamaForCausalLM(_config())
    lm.config._attn_implementation = "flex_attention"
    assert not prunable(lm.model)


def test_eager_with_a_boolean_mask_runs_the_layer_whole():
    """Eager attention adds a boolean 4D mask as numbers; the pruned path would mask instead, so it
    steps aside and the result stays what the model computes."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config("eager"))
    ids = torch.randint(1, 61, (1, 8))
    mask = torch.ones(1, 1, 8, 8).tril().bool()
    index = torch.tensor([3, 7])
    a = hidden_at(lm.model, index, input_ids=ids, attention_mask=mask)
    b = hidden_at(lm.model, index, prune=False, input_ids=ids, attention_mask=mask)
    assert torch.equal(a, b)


def test_ppo_response_positions_give_the_full_passes_logps_values_and_gradients():
    """PolicyAndValue with a response mask (heads and last layers at the response only) equals the whole
    pass read at the response: log-probs, values and every gradient."""
    from align.models.policy_value import PolicyAndValue, response_logps, token_logps

    torch.manual_seed(0)
    cfg = _config()
    policy = LlamaForCausalLM(cfg)
    cfg_v = _config()
    cfg_v.num_labels = 1
    model = PolicyAndValue(policy, LlamaForSequenceClassification(cfg_v))
    ids = torch.randint(1, 61, (3, 12))
    attn = torch.ones(3, 12, dtype=torch.bool)
    attn[1, 9:] = False  # right padding
    response = torch.zeros(3, 12, dtype=torch.bool)
    response[0, 5:12] = response[1, 4:9] = response[2, 8:12] = True

    def run(pruned):
        if pruned:
            logits, values = model(ids, attn, response)
            logps = response_logps(logits, ids, response, 0.7)
        else:
            logits, values = model(ids, attn)
            logps = token_logps(logits / 1.0, ids, 0.7)
        return torch.stack([torch.where(response, logps, 0), torch.where(response, values, 0)])

    _assert_same(_both(model, run))
