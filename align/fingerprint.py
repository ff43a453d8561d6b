"""A stage's fingerprint: what its result depends on (its config, the seed and round, its upstream stages'
fingerprints, the content of the files it reads), so a rerun skips a stage whose fingerprint is unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

from align.config.recipe import Recipe

VERSION = "0.2.0"  # part of every fingerprint: results of an older contract are recomputed


def _hash_path(path: Path, h) -> None:
    if path.is_file():
        h.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            st = child.stat()
            h.update(f"{child.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())


def fingerprint(recipe: Recipe, stage, round_: int, upstream_fps: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(VERSION.encode())
    h.update(stage.model_dump_json(by_alias=True).encode())
    h.update(f"seed={recipe.seed};round={round_}".encode())
    for ref in sorted(stage.references()):
        h.update(f"{ref}={upstream_fps.get(ref, 'none')}".encode())  # 'prev.X' is absent in round 1
    for spec in stage.sources():  # the content of the files it reads
        for p in getattr(spec, "paths", None) or []:
            _hash_path(Path(p), h)
        path = getattr(spec, "path", None)
        if isinstance(path, str) and Path(path).exists():
            _hash_path(Path(path), h)
    return h.hexdigest()[:20]
