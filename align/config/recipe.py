"""The Recipe: YAML -> overrides -> validated pydantic model, with errors a person can act on.

Nothing here imports torch: a bad recipe fails in well under a second.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from align.config.checks import check_recipe, suggest
from align.config.registry import STAGE_BY_KIND, STAGE_TYPES
from align.config.specs import Strict

Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]  # noqa: UP007 (tuple unpacking)


class RecipeError(ValueError):
    """A recipe that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: invalid recipe\n" + "\n".join(f"  - {p}" for p in problems))


class Recipe(Strict):
    """A named chain of stages, run in order, optionally repeated for several rounds."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*$",
                      description="run name (letters, digits, _ - . ; not starting with a dot); outputs go to "
                      "output_dir/name")
    seed: int = Field(0, description="seed for data order, initialisation and sampling")
    output_dir: str = Field("runs", description="root folder for runs")
    rounds: int = Field(1, gt=0, description="how many times the block of stages is repeated")
    stages: list[Stage] = Field(..., min_length=1, description="stages, run in order")

    @field_validator("output_dir")
    @classmethod
    def _no_climbing(cls, v: str) -> str:
        if ".." in Path(v).parts:
            raise ValueError(f"'{v}' climbs out with '..'; give an absolute path instead")
        return v

    def stage(self, name: str):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides. ``seed=3`` sets a top-level key; ``sft.train.optim.lr=1e-4`` a key
    of the stage named ``sft``. Values are parsed as YAML (numbers, booleans, lists)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        stages = {s.get("name"): s for s in data.get("stages", []) if isinstance(s, dict)}
        if parts[0] in stages and parts[0] not in Recipe.model_fields:
            target, parts = stages[parts[0]], parts[1:]
            fields = _fields_of(STAGE_BY_KIND.get(target.get("kind")))
        elif len(parts) == 1:
            target, fields = data, None
        else:
            options = list(stages) + list(Recipe.model_fields)
            problems.append(f"override '{key}': no stage named '{parts[0]}'{suggest(parts[0], options)}")
            continue
        for p in parts[:-1]:
            field = (fields or {}).get(p)
            if p not in target:  # start from the field's default, so other keys keep their defaults
                target[p] = _default_mapping(field)
            target = target[p]
            fields = _fields_of(field.annotation) if field is not None else None
            if not isinstance(target, dict):
                problems.append(f"override '{key}': '{p}' is not a mapping")
                break
        else:
            target[parts[-1]] = _parse_value(value)
    if problems:
        raise RecipeError("command line", problems)
    return data


def _default_mapping(field) -> dict:
    """A nested spec's default as a plain mapping (``{}`` when it has none)."""
    if field is None:
        return {}
    default = field.get_default(call_default_factory=True)
    return default.model_dump(by_alias=True) if isinstance(default, BaseModel) else {}


def _fields_of(annotation) -> dict | None:
    """Field names of a pydantic model type, looking through Optional/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _fields_of(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _fields_of(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields
    return None


def _describe(loc: tuple, data: dict) -> tuple[str, list[str]]:
    """Turn a pydantic error location into ``stages[sft].train.lr`` and the valid keys at that spot."""
    path, fields, node = [], Recipe.model_fields, data
    i = 0
    while i < len(loc):
        part = loc[i]
        if path == ["stages"] and isinstance(part, int):
            stage_data = node[part] if isinstance(node, list) and part < len(node) else {}
            name = stage_data.get("name", part) if isinstance(stage_data, dict) else part
            path[-1] = f"stages[{name}]"
            cls = STAGE_BY_KIND.get(stage_data.get("kind")) if isinstance(stage_data, dict) else None
            fields, node = (cls.model_fields if cls else None), stage_data
            if i + 1 < len(loc) and loc[i + 1] in STAGE_BY_KIND:
                i += 1  # the discriminator tag pydantic inserts
            i += 1
            continue
        path.append(str(part))
        if i == len(loc) - 1:
            break
        info = fields.get(part) if fields and isinstance(part, str) else None
        if info is None and fields:
            info = next((f for f in fields.values() if f.alias == part), None)
        fields = _fields_of(info.annotation) if info is not None else None
        node = node.get(part, {}) if isinstance(node, dict) else {}
        i += 1
    keys = []
    for fname, finfo in (fields or {}).items():
        keys.append(finfo.alias or fname)
    return ".".join(path), keys


def format_validation_error(err: ValidationError, data: dict) -> list[str]:
    lines = []
    for e in err.errors():
        where, keys = _describe(tuple(e["loc"]), data)
        if e["type"] == "extra_forbidden":
            bad = str(e["loc"][-1])
            lines.append(f"{where}: unknown key{suggest(bad, keys)}")
        elif e["type"] == "union_tag_invalid":
            kinds = ", ".join(STAGE_BY_KIND)
            lines.append(f"{where}: unknown stage kind {e['input'].get('kind')!r}; known kinds: {kinds}")
        elif e["type"] == "union_tag_not_found":
            lines.append(f"{where}: missing 'kind' (one of: {', '.join(STAGE_BY_KIND)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where or 'recipe'}: {msg}")
    return lines


def load_recipe(path: str | Path, overrides: list[str] | None = None, contents: bool = True) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the file and every bad key.
    ``contents=False``: do not read the files it names (a run's stages reload the recipe it checked)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["the top level must be a mapping with name and stages"])
    return recipe_from_dict(data, overrides or [], source=str(path), contents=contents)


def recipe_from_dict(data: dict, overrides: list[str] | None = None, source: str = "recipe",
                     contents: bool = True) -> Recipe:
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(source, format_validation_error(err, data)) from None
    problems = check_recipe(recipe.stages, recipe.rounds, contents)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
