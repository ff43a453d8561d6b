"""What a stage receives and returns. Every stage module exposes ``run(stage, ctx) -> StageResult``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.config.recipe import Recipe
from align.config.specs import PREV, DataSpec, ModelSpec, as_refs


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
    upstream: dict[str, StageResult] = field(default_factory=dict)  # "NAME": this round, "prev.NAME": last
    history: dict[int, dict[str, StageResult]] = field(default_factory=dict)  # earlier rounds, all stages

    @property
    def seed(self) -> int:
        return self.recipe.seed + 1000 * (self.round - 1)

    def model_path(self, spec: ModelSpec) -> str:
        """The first listed stage that has a model output, else ``spec.path``."""
        for ref in as_refs(spec.from_stage):
            result = self.upstream.get(ref)
            if result is not None and "model" in result.artifacts:
                return result.artifacts["model"]
        if spec.path is not None:
            return spec.path
        raise StageInputError(f"none of {as_refs(spec.from_stage)} has a model output in round {self.round}")

    def data_paths(self, spec: DataSpec, artifact: str = "data") -> list[str]:
        """Files of ``spec.paths`` and the ``artifact`` outputs of every listed stage (and, with
        ``accumulate``, of the same stages in every earlier round), oldest first."""
        out: list[str] = []
        for ref in as_refs(spec.from_stage):
            name = ref.removeprefix(PREV)
            if spec.accumulate:
                last = self.round - (2 if ref.startswith(PREV) else 1)
                for r in range(1, last + 1):
                    earlier = self.history.get(r, {}).get(name)
                    if earlier is not None and artifact in earlier.artifacts:
                        out.append(earlier.artifacts[artifact])
            result = self.upstream.get(ref)
            if result is None:
                if ref.startswith(PREV):
                    continue  # no earlier round ran it (round 1)
                raise StageInputError(f"stage '{ref}' has not run")
            if artifact not in result.artifacts:
                raise StageInputError(f"stage '{ref}' has no '{artifact}' output")
            out.append(result.artifacts[artifact])
        missing = [p for p in spec.paths if not Path(p).is_file()]
        if missing:
            raise StageInputError(f"data file(s) not found: {', '.join(missing)}")
        return list(dict.fromkeys(list(spec.paths) + out))


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
