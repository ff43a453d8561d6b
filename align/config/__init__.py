"""Recipe configuration (pydantic, no torch)."""

from align.config.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_from_dict
from align.config.specs import DataSpec, LaunchConfig, LoraConfig, ModelSpec, OptimConfig, TrainConfig
from align.config.stages import STAGE_TYPES, SFTStage

__all__ = [
    "STAGE_TYPES", "DataSpec", "LaunchConfig", "LoraConfig", "ModelSpec", "OptimConfig", "Recipe",
    "RecipeError", "SFTStage", "TrainConfig", "dump_recipe", "load_recipe", "recipe_from_dict",
]
