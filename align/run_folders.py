"""The folders of a run and align's markers in them: a run folder (``OUTPUT_DIR/NAME/``) and a stage's folder
inside it, the folder a stage writes into, and the swap that puts a complete rebuild in place of the finished
result it replaces (``NAME.next`` -> ``NAME``), so a rerun that fails or is killed never loses a finished
result. align writes only into folders it made (its marker) or empty ones: a run folder holding anything
else (a ``report.md`` of the user's, say) is refused before any work. No torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.io_atomic import write_text_atomic
from align.runtime import StageInputError

MARKER = "stage.json"  # written by the runner into every stage folder it makes: {"fingerprint", "kind"}
RUN_MARKER = "run.json"  # written by the runner into every run folder it writes into: {"made_by": "align"}


def marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_made_by_align(folder: Path) -> None:
    """A stage folder that exists, is not empty and has no marker is someone else's: never touched."""
    if folder.is_dir() and marker(folder) is None and any(folder.iterdir()):
        raise StageInputError(f"{folder} exists but align did not make it (no {MARKER}); move it away")


def made_by_align(run_dir: Path) -> bool:
    """A run folder that holds align's marker, or (made before run markers) its lock's record or a stage
    folder with the stage marker."""
    try:
        if json.loads((run_dir / RUN_MARKER).read_text()).get("made_by") == "align":
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return (run_dir / ".align.lock.json").is_file() or any(run_dir.glob(f"round_*/*/{MARKER}"))


def check_run_folder(run_dir: Path) -> None:
    """Before any work: the run folder is absent, empty, or align's; anything else is someone else's and
    align writes nothing into it (its report.md, resolved.yaml, report.json would be replaced)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise StageInputError(f"run folder {run_dir} is a file; choose another name= or output_dir=")
    if made_by_align(run_dir):
        return
    held = sorted(p.name for p in run_dir.iterdir())
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise StageInputError(f"run folder {run_dir} exists but align did not make it (no {RUN_MARKER}; it holds "
                              f"{shown}): align writes only into a run folder it made or an empty one; move it "
                              "away, or choose another name= or output_dir=")


def mark_run_folder(run_dir: Path) -> None:
    """Put align's marker in a run folder it writes into (once: an existing marker stays as it is)."""
    marker_file = run_dir / RUN_MARKER
    if not marker_file.is_file():
        write_text_atomic(marker_file, json.dumps({"made_by": "align"}) + "\n")


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


def drop_stale_rebuild(out: Path) -> bool:
    """Remove ``NAME.next``, an unfinished rebuild of another configuration, once ``NAME`` is up to date (a
    rebuild that failed or was killed, then the configuration set back): True when one was removed."""
    staged = out.with_name(out.name + ".next")
    if not staged.exists():
        return False
    remove_stage_folder(staged)
    return True


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
