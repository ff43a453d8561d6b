"""A stage's folder inside a run: the runner's marker, the folder a run writes into, and the swap that puts
a complete rebuild in place of the finished result it replaces (``NAME.next`` -> ``NAME``), so a rerun that
fails or is killed never loses a finished result. No torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.runtime import StageInputError

MARKER = "stage.json"  # written by the runner into every stage folder it makes: {"fingerprint", "kind"}


def marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_made_by_align(folder: Path) -> None:
    """A stage folder that exists, is not empty and has no marker is someone else's: never touched."""
    if folder.is_dir() and marker(folder) is None and any(folder.iterdir()):
        raise StageInputError(f"{folder} exists but align did not make it (no {MARKER}); move it away")


def remove_stage_folder(folder: Path) -> None:
    """Delete a folder of the run only if the runner made it (it holds the marker)."""
    if folder.exists():
        check_made_by_align(folder)
        shutil.rmtree(folder)


def settle_swap(out: Path) -> None:
    """Finish a swap a killed run left half done: ``NAME.next`` complete and ``NAME`` gone -> move it in;
    ``NAME.old`` (the replaced result) is removed once ``NAME`` is there again."""
    staged, old = out.with_name(out.name + ".next"), out.with_name(out.name + ".old")
    if not out.exists():
        if (staged / "result.json").exists():
            staged.rename(out)
        elif old.exists():
            old.rename(out)
    if out.exists() and old.exists():
        shutil.rmtree(old)


def work_dir(out: Path, fp: str, kind: str) -> Path:
    """Where a stage that must run writes: its own folder, unless that holds a finished result of another
    configuration, which stays untouched until the replacement is complete (then :func:`swap`)."""
    mark = marker(out)
    if mark is not None and mark.get("fingerprint") == fp:
        return out  # an interrupted run of this very work: resume it
    if mark is not None and (out / "result.json").exists():
        work = out.with_name(out.name + ".next")
        staged = marker(work)
        if staged is not None and staged.get("fingerprint") == fp:
            return work  # an interrupted rebuild of this very work: resume it
    else:
        work = out
    remove_stage_folder(work)  # an unfinished build of other work
    work.mkdir(parents=True)
    (work / MARKER).write_text(json.dumps({"fingerprint": fp, "kind": kind}))
    return work


def swap(work: Path, out: Path) -> None:
    """Put a complete rebuild in place of the result it replaces (two renames; see :func:`settle_swap`)."""
    if work == out:
        return
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    work.rename(out)
    shutil.rmtree(old)
