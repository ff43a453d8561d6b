"""align.config.smoke.shrink: every shipped recipe, shrunk, still validates and keeps its stages and wiring,
and the shrunk sizes are what the notebooks' CI runs rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align.config.recipe import recipe_from_dict
from align.config.smoke import TINY, shrink

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem in ("llama3_round", "dpo_vs_ppo", "ppo", "dpo", "llama2_rlhf_v1_v5", "gatt")],
                         ids=lambda p: p.stem)
def test_shrunk_recipes_validate_with_the_same_stages(path):
    data = yaml.safe_load(path.read_text())
    small = shrink(data)
    assert [s["name"] for s in small["stages"]] == [s["name"] for s in data["stages"]]
    assert data == yaml.safe_load(path.read_text())  # the original is not modified
    recipe = recipe_from_dict(small)
    for stage in recipe.stages:
        if stage.kind == "evaluate":
            assert stage.prompts.builtin_size == 24
            assert stage.retention is None or stage.retention.dialogues <= 16
        if stage.kind == "ppo":
            assert stage.iterations == 4
        if stage.kind == "dpo":
            assert stage.train.max_steps == 4
        if getattr(stage.model, "path", None) == "builtin:tiny":
            assert stage.model.tiny.hidden_size == TINY["hidden_size"]


def test_tiny_model_replaces_every_model_given_by_path():
    """The sentiment notebook's CI size: SmolLM2 (a GGUF file) becomes the built-in tiny model everywhere a
    path names it (policy, reference, reward model), LoRA and dtype kept, best-of-N cut to the shrunk k."""
    data = yaml.safe_load((RECIPES[0].parent / "smollm2_sentiment.yaml").read_text())
    assert not recipe_from_dict(shrink(data)).stages[0].model.path.startswith("builtin:")  # off: untouched
    recipe = recipe_from_dict(shrink(data, tiny_model=True))
    for stage in recipe.stages:
        for spec in (stage.model, getattr(stage, "reference", None)):
            assert spec is None or spec.path in (None, "builtin:tiny")
        if stage.kind == "rejection_sampling":
            assert max(stage.best_of, default=1) <= stage.k == 4
        if stage.kind == "dpo":
            assert stage.model.lora is not None and stage.model.lora.last_layers is None
        assert stage.model.dtype == "bfloat16"  # the recipe's precision is kept: CI runs the bf16 paths
        for spec in (stage.model, getattr(stage, "value_model", None)):
            assert spec is None or spec.lora is None or spec.lora.last_layers is None  # one from a stage too
