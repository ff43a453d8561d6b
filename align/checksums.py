"""SHA-256 digests of what was written, checked before it is read again: a bit flipped on disk or in a copy
leaves sizes and headers intact, and only the content tells.

- training checkpoints (:mod:`align.train.checkpoints`) keep the digests of their files in
  ``loop_state.json`` (written last and atomically); a file that no longer matches passes the checkpoint
  over, like any other damage;
- saved models (a stage's ``model/``, snapshots) get :data:`MANIFEST` beside their files, written last and
  atomically by :func:`write_manifest`: ``{"format": 1, "files": {"<relative path>": {"size": n,
  "sha256": hex}}}``. Loaders call :func:`verify_model_folder`, which stops with
  :class:`DamagedModelError` naming the first file that differs. A folder without a manifest (a user's own
  model, a hub id) is not checked.

Files are read in chunks: one read of the files per check, which is small next to loading them. A folder
that a process verified is read again only when a file's size or modification time has changed since.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable
from pathlib import Path

from align.io_atomic import write_text_atomic
from align.runtime import StageInputError

MANIFEST = "align_manifest.json"
_CHUNK = 1 << 24
_verified: dict[str, tuple] = {}  # folder -> the stats of its files when it was last verified


class DamagedModelError(StageInputError):
    """A saved model's file no longer holds what was written (its SHA-256 differs from the manifest's)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path, skip: Collection[str] = ()) -> list[str]:
    """The paths (relative, ``/``-separated) of every file under ``folder``, sorted; ``skip``: names left out."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in skip)


def digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: sha256_file(Path(folder) / name) for name in names}


def mismatch(folder: Path, sha256: dict[str, str]) -> str | None:
    """The first file of ``sha256`` (relative path -> hex digest) that is missing from ``folder`` or whose
    content differs, as a sentence; None when all match."""
    for name, want in sha256.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != want:
            return f"{name} does not match its SHA-256 checksum (its content changed after it was written)"
    return None


def write_manifest(folder: Path) -> Path:
    """Write ``folder/MANIFEST`` (every other file's size and SHA-256), atomically; call it last."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in folder_files(folder, skip={MANIFEST})}
    write_text_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
    return folder / MANIFEST


def verify_model_folder(path: str | Path) -> None:
    """Raise :class:`DamagedModelError` when ``path`` has a :data:`MANIFEST` and a file it lists is missing,
    of another size or of other content; nothing to check without one (a user's own model, a hub id)."""
    folder = Path(path)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    key, stamp = str(folder.resolve()), _stamp(folder)
    if _verified.get(key) == stamp:
        return
    how = ("it was damaged after align saved it: run the stage that wrote it again (delete the result.json "
           "of that stage's folder), or restore the folder from a copy")
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        sha256 = {name: str(entry["sha256"]) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedModelError(f"model folder {folder}: {MANIFEST} is unreadable ({err}); {how}") from None
    for name, size in sizes.items():  # cheap first: a missing or cut-short file needs no hashing
        if (folder / name).is_file() and (folder / name).stat().st_size != size:
            raise DamagedModelError(f"model folder {folder}: {name} has {(folder / name).stat().st_size} bytes, "
                                    f"{size} were written; {how}")
    problem = mismatch(folder, sha256)
    if problem is not None:
        raise DamagedModelError(f"model folder {folder}: {problem}; {how}")
    _verified[key] = stamp


def _stamp(folder: Path) -> tuple:
    """Size and modification time of every file under ``folder``: what a verification stays valid for."""
    return tuple((name, st.st_size, st.st_mtime_ns) for name in folder_files(folder)
                 for st in [(folder / name).stat()])
