"""What a stage receives and returns. Every stage module exposes ``run(stage, ctx) -> StageResult``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from align.config.base import MODELS, Artifact
from align.config.recipe import Recipe
from align.config.specs import PREV, DataSpec, ModelSpec, as_refs


class StageInputError(ValueError):
    """A stage's inputs cannot be found or used."""


class StageStopped(RuntimeError):
    """A stage stopped for a reason its message tells the user how to fix (e.g. training diverged)."""


REPORT_BUG = ("this is a bug in align, not a problem with your input: please report it with the command "
              "and the traceback above")


class StageFailed(RuntimeError):
    """A stage's process ended with an error. ``user_error``: bad input (the message says what), not a bug."""

    def __init__(self, stage: str, round_: int, message: str, user_error: bool = False):
        self.stage, self.round, self.user_error = stage, round_, user_error
        super().__init__(f"stage '{stage}' (round {round_}) failed: {message}")


@dataclass
class StageResult:
    artifacts: dict[Artifact, str] = field(default_factory=dict)  # artifact type -> path
    metrics: dict[str, float] = field(default_factory=dict)  # flat name -> number
    seconds: float | None = None  # how long the stage took (kept, so a skipped stage still reports it)

    def to_json(self, root: Path | None = None) -> dict:
        """Artifact paths inside ``root`` (the run folder) are written relative to it, so a run folder
        that is moved or copied still finds its own artifacts."""
        data = {"artifacts": {str(k): _relative(v, root) for k, v in self.artifacts.items()},
                "metrics": self.metrics}
        if self.seconds is not None:
            data["seconds"] = round(self.seconds, 1)
        return data

    @classmethod
    def from_json(cls, data: dict, root: Path | None = None) -> StageResult:
        artifacts = {Artifact(k): _absolute(v, root) for k, v in data.get("artifacts", {}).items()}
        return cls(artifacts, data.get("metrics", {}), data.get("seconds"))


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:  # outside the run folder: kept as it is
        return path


def _absolute(path: str, root: Path | None) -> str:
    return path if root is None or Path(path).is_absolute() else str(Path(root) / path)


@dataclass
class StageContext:
    recipe: Recipe
    round: int  # 1-based
    out_dir: Path  # this stage's folder
    upstream: dict[str, StageResult] = field(default_factory=dict)  # "NAME": this round, "prev.NAME": last
    history: dict[int, dict[str, StageResult]] = field(default_factory=dict)  # earlier rounds, all stages
    outputs: dict[Artifact, str] = field(default_factory=dict)  # what the stage declares it writes

    def output(self, kind: Artifact) -> Path:
        """Where the stage writes its ``kind`` output (declared by its config class)."""
        if kind not in self.outputs:
            raise KeyError(f"this stage does not declare a {kind} output (declared: {list(map(str, self.outputs))})")
        return Path(self.out_dir) / self.outputs[kind]

    @property
    def seed(self) -> int:
        return self.recipe.seed + 1000 * (self.round - 1)

    def model_path(self, spec: ModelSpec, kinds: tuple[Artifact, ...] = MODELS) -> str:
        """The model of the first listed stage that has run, else ``spec.path``."""
        path = self.ran(spec, kinds)
        if path is not None:
            return path
        if spec.path is not None:
            return spec.path
        raise StageInputError(f"none of {as_refs(spec.from_stage)} has run by round {self.round}")

    def ran(self, spec, kinds: tuple[Artifact, ...] = MODELS) -> str | None:
        """The output of the first stage ``spec`` names that has run (``kinds``: the first it has), else None."""
        for ref in as_refs(spec.from_stage):
            result = self.upstream.get(ref)
            if result is not None:
                return _pick(ref, result, kinds)
        return None

    def data_paths(self, spec: DataSpec, kinds: tuple[Artifact, ...]) -> list[str]:
        """Files of ``spec.paths`` and the outputs of every listed stage (the first of ``kinds`` each has;
        with ``accumulate``, also those of the same stages in every earlier round), oldest first."""
        out: list[str] = []
        for ref in as_refs(spec.from_stage):
            name = ref.removeprefix(PREV)
            if spec.accumulate:
                last = self.round - (2 if ref.startswith(PREV) else 1)
                for r in range(1, last + 1):
                    earlier = self.history.get(r, {}).get(name)
                    if earlier is not None:
                        out.append(_pick(ref, earlier, kinds))
            result = self.upstream.get(ref)
            if result is None:
                if ref.startswith(PREV):
                    continue  # no earlier round ran it (round 1)
                raise StageInputError(f"stage '{ref}' has not run")
            out.append(_pick(ref, result, kinds))
        missing = [p for p in spec.paths if not Path(p).is_file()]
        if missing:
            raise StageInputError(f"data file(s) not found: {', '.join(missing)}")
        return list(dict.fromkeys(list(spec.paths) + out))


def _pick(ref: str, result: StageResult, kinds: tuple[Artifact, ...]) -> str:
    for kind in kinds:
        if kind in result.artifacts:
            return result.artifacts[kind]
    has = ", ".join(map(str, result.artifacts)) or "nothing"
    raise StageInputError(f"stage '{ref}' produced {has}; expected {' or '.join(map(str, kinds))}")


def write_result(out_dir: Path, result: StageResult, fingerprint: str, root: Path | None = None) -> None:
    """``result.json``, written atomically; artifact paths relative to ``root`` (the run folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **result.to_json(root)}, indent=1))
    tmp.replace(out_dir / "result.json")


def read_result(out_dir: Path, root: Path | None = None) -> tuple[str | None, StageResult | None]:
    """-> (fingerprint, result) of ``out_dir/result.json``; relative artifact paths resolved under ``root``."""
    path = out_dir / "result.json"
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _damaged(path, f"cannot be read ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("artifacts", "metrics")):
        raise _damaged(path, "is not a stage result")
    try:
        return data.get("fingerprint"), StageResult.from_json(data, root)
    except ValueError:  # written by an older version with other artifact names: run the stage again
        return None, None


def _damaged(path: Path, why: str) -> StageInputError:
    """A ``result.json`` the runner did not write as it is (it writes it whole, atomically): refused, not
    rebuilt over, since what the stage left beside it may be what the user wants to keep."""
    return StageInputError(f"{path} {why}: align writes it whole, so something else changed it; delete it "
                           "to run the stage again")
