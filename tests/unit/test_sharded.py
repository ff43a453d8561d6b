"""Sharded training (ZeRO-3, FSDP): PPO's rollouts gather the weights once per rollout, checkpoints are saved from
the gathered weights; nothing changes in any other setting (stand-ins for deepspeed and accelerate here)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch

from align.train.sharded import gathered_for_generation, zero_stage


def _accelerator(stage: int | None):
    plugin = None if stage is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_zero3_gathers_every_parameter_once_for_the_rollout(monkeypatch):
    calls = []

    class Gathered:
        def __init__(self, params, modifier_rank):
            calls.append(("enter", len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append(("exit",))

    fake = types.ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=Gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with gathered_for_generation(_accelerator(3), model) as inside:
        assert inside is model and calls == [("enter", 4, None)]
    assert calls[-1] == ("exit",)


def test_other_settings_gather_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it would fail
    model = torch.nn.Linear(2, 2)
    for stage in (None, 0, 1, 2):
        with gathered_for_generation(_accelerator(stage), model) as inside:
            assert inside is model
    assert [zero_stage(_accelerator(s)) for s in (None, 2, 3)] == [0, 2, 3]


def test_checkpoints_are_saved_from_the_gathered_weights(tmp_path):
    from safetensors.torch import load_file

    from align.config.specs import ModelSpec
    from align.models.loading import build_tiny_model, load_tokenizer, save_checkpoint
    from align.train.sharded import full_state_dict

    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    lm = build_tiny_model(ModelSpec(path="builtin:tiny", tiny=tiny), len(tok), seed=0)
    wrapper = torch.nn.Module()
    wrapper.lm = lm
    # what a sharded process holds of its own module is not the weights: the gather is
    gathered = {k: torch.full_like(v, 0.5) for k, v in wrapper.state_dict().items()}
    fsdp = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), distributed_type="DistributedType.FSDP",
                           get_state_dict=lambda model: gathered)
    state = full_state_dict(fsdp, wrapper, "lm")
    assert set(state) == set(lm.state_dict())
    save_checkpoint(lm, tok, tmp_path / "out", state)
    saved = load_file(str(tmp_path / "out/model.safetensors"))
    assert all(torch.all(v == 0.5) for v in saved.values())
    ddp = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), distributed_type="DistributedType.MULTI_GPU")
    assert full_state_dict(ddp, wrapper, "lm") is None and full_state_dict(_accelerator(2), wrapper, "lm") is None
    zero3 = SimpleNamespace(**vars(_accelerator(3)), distributed_type="DistributedType.DEEPSPEED",
                            get_state_dict=lambda model: gathered)
    assert set(full_state_dict(zero3, wrapper, "lm")) == set(lm.state_dict())


def test_a_lora_model_with_sharded_weights_is_refused_clearly(tmp_path):
    import pytest

    from align.config.specs import ModelSpec
    from align.models.loading import load_causal_lm, load_tokenizer, save_checkpoint

    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    lora = load_causal_lm(ModelSpec(path="builtin:tiny", lora={"r": 2, "alpha": 4}), "builtin:tiny", tok)
    with pytest.raises(ValueError, match="LoRA model trained with sharded weights"):
        save_checkpoint(lora, tok, tmp_path / "out", state_dict={})
