"""One ``align run`` per run folder at a time.

The lock is an OS file lock (``filelock``) on ``RUN_DIR/.align.lock``: the operating system drops it when
the process holding it ends, however it ends, so a killed or crashed run never leaves the folder stuck.
Beside it, ``.align.lock.json`` says who holds it (process, host, command, since when) so a second run can
tell the user; that file is only ever read while the lock is held by someone, so a stale copy is harmless.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from align.runtime import StageInputError


class RunFolderBusy(StageInputError):
    """Another ``align run`` is writing into the same run folder."""


def _holder(info: Path) -> str:
    try:
        who = json.loads(info.read_text())
    except (OSError, ValueError):
        return "another process (details unavailable)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("since", 0)))
    return f"process {who.get('pid')} on {who.get('host')} since {since} (`{who.get('command', '?')}`)"


@contextmanager
def run_folder_lock(run_dir: Path):
    """Hold the run folder's lock for the duration; raise :class:`RunFolderBusy` at once if it is held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path, info = run_dir / ".align.lock", run_dir / ".align.lock.json"
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusy(
            f"run folder {run_dir} is in use by {_holder(info)}; wait for it to finish, stop it, or choose "
            "another name= or output_dir="
        ) from None
    try:
        tmp = info.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                   "command": " ".join(sys.argv)}))
        tmp.replace(info)
        yield
    finally:
        lock.release()
