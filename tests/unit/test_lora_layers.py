"""``lora.last_layers``: adapters on the last N decoder layers only, in policies and reward models, and no
gradient reaches the layers below (the point of the setting: the backward pass stops early)."""

import pytest
import torch

from align.config.specs import ModelSpec
from align.models.loading import load_causal_lm, load_tokenizer
from align.models.reward import load_reward_model

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def _spec(**lora):
    return ModelSpec(path="builtin:tiny", tiny=TINY, lora={"r": 2, "alpha": 4, **lora})


def _adapted_layers(model) -> set[int]:
    names = [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return {int(n.split(".layers.")[1].split(".")[0]) for n in names}


@pytest.mark.parametrize("load", [load_causal_lm, load_reward_model])
def test_last_layers_adapts_only_the_top_of_the_stack(load):
    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    assert _adapted_layers(load(_spec(), "builtin:tiny", tok)) == {0, 1, 2}
    model = load(_spec(last_layers=1), "builtin:tiny", tok)
    assert _adapted_layers(model) == {2}
    # every linear layer of the last decoder layer is adapted, as with all-linear
    kinds = {n.split(".layers.2.")[1].split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with pytest.raises(ValueError, match="lora.last_layers=4: the model has 3 decoder layers"):
        load(_spec(last_layers=4), "builtin:tiny", tok)


def test_no_gradient_below_the_adapted_layers():
    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    model = load_causal_lm(_spec(last_layers=1), "builtin:tiny", tok)
    needs_grad = {}
    for i in range(3):
        layer = model.base_model.model.model.layers[i]
        layer.register_forward_hook(lambda mod, args, out, i=i: needs_grad.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.randint(0, len(tok), (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert needs_grad == {0: False, 1: False, 2: True}


def test_a_bf16_reward_model_trains_its_head_in_float32():
    """dtype bfloat16 + LoRA: the decoder and the adapters' base weights stay bf16, the trainable head moves to
    float32 (an update of 1e-4 on weights of ~0.05 would round away in bf16) and scores in float32."""
    from align.models.reward import PackedRewards, backbone_and_head

    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    spec = ModelSpec(path="builtin:tiny", tiny=TINY, dtype="bfloat16", lora={"r": 2, "alpha": 4, "last_layers": 1})
    model = load_reward_model(spec, "builtin:tiny", tok)
    decoder, head = backbone_and_head(model)
    trained = [p for p in head.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert decoder.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(3, len(tok), (2, 12))
    scores = PackedRewards(model)(ids, torch.arange(12).expand(2, 12), None, torch.tensor([11, 23]))
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    before = [p.detach().clone() for p in trained]
    torch.optim.SGD(trained, lr=1e-4).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trained, strict=True))  # bf16 would keep most
