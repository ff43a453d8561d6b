"""PPO with the vllm backend: the engine starts once from the policy's checkpoint and gets the current
weights before every rollout. vLLM needs a GPU, so a stand-in engine plays it here: it holds its own copy
of the model, takes weights only through ``load_weights`` and samples with the HF code path. Synced
correctly, its rollouts are the hf backend's (same seeds, same weights), iteration by iteration; an engine
that kept its starting weights would sample from a stale policy from iteration 2 on."""

from __future__ import annotations

import pytest
import torch

import align.train.ppo as ppo
from align.config.recipe import recipe_from_dict
from align.generation import make_generator
from align.models.loading import plain_weights
from align.runner import run_stage
from tests.integration.test_ppo import recipe, rows

pytestmark = pytest.mark.usefixtures("one_thread")


class StandInEngine:
    """What align needs of a vLLM generator: sample, load_weights, close."""

    instances: list[StandInEngine] = []

    def __init__(self, path, tokenizer, **options):
        from align.config.specs import ModelSpec
        from align.models.loading import load_causal_lm

        self.options = options
        self.model = load_causal_lm(ModelSpec(path=path), path, tokenizer).eval()
        self.hf = make_generator("hf", model=self.model, tokenizer=tokenizer)
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.closed = False
        StandInEngine.instances.append(self)

    def load_weights(self, weights):
        weights = dict(weights)
        missing = set(self.model.state_dict()) - set(weights) - {"lm_head.weight"}  # tied to the embedding
        assert not missing, missing
        self.model.load_state_dict(weights, strict=False)
        self.loaded.append({k: v.clone() for k, v in weights.items()})

    def sample(self, prompts, k, params):
        return self.hf.sample(prompts, k, params)

    def close(self):
        self.closed = True


def _fake_make(backend, model_path=None, **kw):
    if backend == "vllm":
        return StandInEngine(model_path, **kw)
    return make_generator(backend, model_path, **kw)


def _start(tmp_path) -> dict:
    """The policy's start as an HF folder (an engine loads a checkpoint, not align's built-in model)."""
    from align.config.specs import ModelSpec
    from align.models.loading import build_tiny_model, load_tokenizer, save_checkpoint
    from tests.integration.test_ppo import TINY

    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    save_checkpoint(build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), len(tok), seed=0), tok,
                    tmp_path / "start")
    return {"path": str(tmp_path / "start")}


def test_vllm_rollouts_follow_the_trained_policy(tmp_path, monkeypatch):
    start = _start(tmp_path)
    hf = recipe_from_dict(recipe(tmp_path / "hf", model=start))
    run_stage(hf, "ppo", 1, "fp")
    monkeypatch.setattr(ppo, "make_generator", _fake_make)
    StandInEngine.instances.clear()
    vllm = recipe_from_dict(recipe(tmp_path / "vllm", model=start, backend="vllm", vllm_gpu_memory=0.4))
    run_stage(vllm, "ppo", 1, "fp")
    (engine,) = StandInEngine.instances  # one engine for the whole stage, started from the policy's start
    assert engine.options == {"gpu_memory_utilization": 0.4} and engine.closed
    assert len(engine.loaded) == 3  # before each of the 3 rollouts
    a, b = rows(tmp_path / "hf/runs/t/round_1/ppo"), rows(tmp_path / "vllm/runs/t/round_1/ppo")
    for ra, rb in zip(a, b, strict=True):
        for k in ("train/score", "train/kl", "train/response_length", "train/pg_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (rb["step"], k)
    # the weights of the last rollout are not the start's: the policy moved and the engine followed
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(engine.loaded[0][name], engine.loaded[-1][name])


def test_plain_weights_of_a_lora_policy_are_the_merged_model():
    from align.config.specs import ModelSpec
    from align.models.loading import load_causal_lm, load_tokenizer
    from tests.integration.test_ppo import TINY

    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    lora = load_causal_lm(ModelSpec(path="builtin:tiny", tiny=TINY, lora={"r": 2, "alpha": 4}), "builtin:tiny", tok)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapter an effect
            torch.nn.init.normal_(p, std=0.1)
    weights = dict(plain_weights(lora))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    plain = load_causal_lm(ModelSpec(path="builtin:tiny", tiny=TINY), "builtin:tiny", tok)
    plain.load_state_dict(weights, strict=False)
    ids = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(plain(input_ids=ids).logits,
                                  load_causal_lm(ModelSpec(path="builtin:tiny", tiny=TINY), "builtin:tiny",
                                                 tok)(input_ids=ids).logits, atol=1e-3)


def test_vllm_backend_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="backend vllm loads an HF checkpoint; builtin:tiny is not one"):
        recipe_from_dict(recipe(tmp_path, backend="vllm"))
