"""What a stage receives and returns. Every stage module exposes ``run(stage, ctx) -> StageResult``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.config.recipe import Recipe
from align.config.specs import DataSpec, ModelSpec


class StageInputError(ValueError):
    """A stage's inputs cannot be found or used."""


@dataclass
class StageResult:
    artifacts: dict[str, str] = field(default_factory=dict)  # e.g. {"model": ".../model", "data": "..."}
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class StageContext:
    recipe: Recipe
    round: int  # 1-based
    out_dir: Path  # this stage's folder
    upstream: dict[str, StageResult] = field(default_factory=dict)  # earlier stages of this round

    @property
    def seed(self) -> int:
        return self.recipe.seed + 1000 * (self.round - 1)

    def model_path(self, spec: ModelSpec) -> str:
        if spec.from_stage is None:
            return spec.path
        return self._artifact(spec.from_stage, "model")

    def data_paths(self, spec: DataSpec, artifact: str = "data") -> list[str]:
        if spec.from_stage is not None:
            return [self._artifact(spec.from_stage, artifact)]
        missing = [p for p in spec.paths if not Path(p).is_file()]
        if missing:
            raise StageInputError(f"data file(s) not found: {', '.join(missing)}")
        return list(spec.paths)

    def _artifact(self, stage: str, name: str) -> str:
        result = self.upstream.get(stage)
        if result is None or name not in result.artifacts:
            raise StageInputError(f"stage '{stage}' has no '{name}' output")
        return result.artifacts[name]


def write_result(out_dir: Path, result: StageResult, fingerprint: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **result.to_json()}, indent=1))
    tmp.replace(out_dir / "result.json")


def read_result(out_dir: Path) -> tuple[str | None, StageResult | None]:
    path = out_dir / "result.json"
    if not path.exists():
        return None, None
    data = json.loads(path.read_text())
    return data.get("fingerprint"), StageResult(data.get("artifacts", {}), data.get("metrics", {}))
