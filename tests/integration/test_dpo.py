"""DPO stage on a tiny model: reward accuracy and margin rise, the policy reloads with plain transformers,
reference log-probs are cached (reused on a rerun, recomputed when the data or the model change)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.config.recipe import recipe_from_dict
from align.config.specs import ModelSpec
from align.models.loading import build_tiny_model, load_tokenizer
from align.models.reference_cache import model_identity
from align.runner import run_recipe, run_stage
from align.runtime import StageInputError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_stage(**kw):
    stage = {
        "name": "dpo", "kind": "dpo", "model": {"path": "builtin:tiny", "tiny": TINY},
        "data": {"builtin": "chat", "builtin_size": 16}, "beta": 0.5,
        "train": {"batch_size": 4, "max_length": 80, "max_steps": 8, "report_to": [],
                  "optim": {"lr": 3e-3, "warmup_ratio": 0.0}},
    }
    stage.update(kw)
    return stage


def run(tmp_path, stages, overrides=()):
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": stages},
                              list(overrides))
    return {r["stage"]: r for r in run_recipe(recipe, log=lambda *_: None)}


def test_dpo_raises_reward_accuracy_and_margin(tmp_path):
    out = run(tmp_path, [dpo_stage(data={"builtin": "chat", "builtin_size": 20, "eval_fraction": 0.2})])
    m = out["dpo"]["metrics"]
    assert m["ref_cache_hit"] == 0.0 and m["ref_forward_passes"] > 0
    assert m["train_pairs_reward_accuracy_start"] == 0.0 and m["train_pairs_reward_margin_start"] == 0.0
    assert m["train_pairs_reward_accuracy"] > 0.5
    assert m["train_pairs_reward_margin"] > 0.1
    assert m["train_pairs_dpo"] < m["train_pairs_dpo_start"]
    assert "eval_reward_accuracy" in m and "eval_reward_accuracy_start" in m
    # the policy's own preference (mean token log-prob, no reference) is defined at the start and rises
    assert 0.0 <= m["train_pairs_logp_accuracy_start"] < m["train_pairs_logp_accuracy"] <= 1.0
    assert "eval_logp_accuracy_start" in m
    path = out["dpo"]["artifacts"]["policy"]
    after = AutoModelForCausalLM.from_pretrained(path)  # plain transformers, no align code
    stage = recipe_from_dict({"name": "t", "stages": [dpo_stage()]}).stage("dpo")
    before = build_tiny_model(stage.model, after.config.vocab_size, seed=0)
    assert not torch.equal(after.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    rows = [json.loads(x) for x in open(tmp_path / "runs/t/round_1/dpo/metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 8
    assert {"train/rewards/accuracy", "train/rewards/margin", "train/nll", "train/dpo"} <= set(train_rows[0])
    assert "start/train_pairs_reward_accuracy" in rows[0] and "end/train_pairs_reward_accuracy" in rows[-1]


def test_reference_cache_reused_and_invalidated(tmp_path):
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tok = load_tokenizer(spec, "builtin:tiny")
    folder = tmp_path / "init"
    build_tiny_model(spec, len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    stage = dpo_stage(model={"path": str(folder)}, metrics_records=4,
                      train={"batch_size": 8, "max_length": 80, "max_steps": 1, "report_to": []})
    first = run(tmp_path, [stage])["dpo"]["metrics"]
    assert first["ref_cache_hit"] == 0.0 and first["ref_forward_passes"] == 2
    # the stage reruns (its config changed) but the reference log-probs are read back
    again = run(tmp_path, [stage], ["dpo.train.optim.lr=1e-3"])["dpo"]["metrics"]
    assert again["ref_cache_hit"] == 1.0 and again["ref_forward_passes"] == 0
    assert again["train_pairs_reward_margin_start"] == pytest.approx(0.0, abs=1e-6)
    # different data: recomputed
    data = run(tmp_path, [stage], ["dpo.data.builtin_size=12"])["dpo"]["metrics"]
    assert data["ref_cache_hit"] == 0.0 and data["ref_forward_passes"] == 2
    assert len(list((tmp_path / "runs/t/ref_cache").glob("*.pt"))) == 2
    # different weights in the model folder: a different key
    before = model_identity(spec, str(folder), 0)
    build_tiny_model(spec, len(tok), seed=1).save_pretrained(folder)
    assert model_identity(spec, str(folder), 0) != before


def test_lora_reference_is_the_base_model_without_a_second_copy(tmp_path, monkeypatch):
    import align.train.reference as reference

    def no_second_model(*a, **k):
        raise AssertionError("the LoRA reference must be the policy with its adapter disabled")

    monkeypatch.setattr(reference, "load_causal_lm", no_second_model)
    stage = dpo_stage(model={"path": "builtin:tiny", "tiny": TINY, "lora": {"r": 4, "alpha": 8}})
    stage["train"]["max_steps"] = 3
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [stage]})
    m = run_stage(recipe, "dpo", 1, "fp").metrics  # in this process, where the patch is
    assert m["ref_forward_passes"] > 0
    assert m["train_pairs_reward_margin_start"] == pytest.approx(0.0, abs=1e-6)
    assert m["train_pairs_reward_margin"] != 0.0


def test_explicit_reference_model_is_loaded(tmp_path):
    other = {"path": "builtin:tiny", "tiny": {**TINY, "hidden_size": 64, "num_attention_heads": 4}}
    stage = dpo_stage(reference=other, metrics_records=4)
    stage["train"]["max_steps"] = 1
    m = run(tmp_path, [stage])["dpo"]["metrics"]
    assert m["ref_forward_passes"] == 4
    assert abs(m["train_pairs_reward_margin_start"]) > 1e-3  # policy start != reference


def test_identical_pairs_are_dropped_with_a_warning_and_all_identical_is_an_input_error(tmp_path, capsys):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    good = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(6)]
    same = [{"prompt": f"Same {i}?", "chosen": "Yes.", "rejected": " Yes. "} for i in range(2)]
    stage = dpo_stage(data={"paths": [write("prefs.jsonl", good + same)]}, metrics_records=4)
    stage["train"].update(max_steps=1, max_length=64)
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [stage]})
    m = run_stage(recipe, "dpo", 1, "fp").metrics  # in this process: its log is captured
    assert m["identical_pairs_dropped"] == 2 and m["dropped_records"] == 0
    assert m["truncated_responses"] == 0 and m["epochs_trained"] == 0.5  # 6 records, 4 a step
    out = capsys.readouterr().out
    assert "[dpo] warning: dropped 2 of 8 preference pairs whose chosen and rejected responses are identical" in out
    assert str(tmp_path / "prefs.jsonl") in out
    stage["data"] = {"paths": [write("same.jsonl", same)]}
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs2"), "stages": [stage]})
    with pytest.raises(StageInputError, match=r"no training pair left in .*same\.jsonl: .* 2 have identical"):
        run_stage(recipe, "dpo", 1, "fp")


@pytest.mark.slow
@pytest.mark.shared_data
def test_runs_on_shared_helpfulness_pairs(tmp_path, shared_data):
    stage = dpo_stage(data={"paths": [str(shared_data / "prefs_helpful.train.jsonl")], "limit": 100},
                      metrics_records=16,
                      train={"batch_size": 8, "max_length": 192, "max_steps": 3, "report_to": []})
    m = run(tmp_path, [stage])["dpo"]["metrics"]
    assert m["steps"] == 3 and m["ref_forward_passes"] > 0
    assert m["mask_id_fallbacks"] == 0
    assert math.isfinite(m["train_loss_last"]) and math.isfinite(m["train_loss_first"])


def test_lora_on_the_top_layer_runs_the_frozen_layer_once_and_a_beta_grid_reuses_it(tmp_path):
    """LoRA on the last of 2 layers: the reference pass keeps the first layer's states (cached with the
    reference log-probs), training runs only the top layer, and a second stage on the same data and start
    (another beta) reads both from the cache."""
    lora = {"path": "builtin:tiny", "tiny": TINY, "lora": {"r": 4, "alpha": 8, "last_layers": 1}}
    out = run(tmp_path, [dpo_stage(model=lora), dpo_stage(name="dpo_b2", model=lora, beta=0.2)])
    first, second = out["dpo"]["metrics"], out["dpo_b2"]["metrics"]
    assert first["trunk_layers"] == 1.0 and first["ref_cache_hit"] == 0.0
    assert second["trunk_layers"] == 1.0 and second["ref_cache_hit"] == 1.0
    for m in (first, second):
        assert m["train_pairs_dpo"] < m["train_pairs_dpo_start"]
