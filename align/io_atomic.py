"""Small files that survive a kill: whole-file writes that are atomic, and line stores (JSON lines) that a
kill can cut short only at their last line, which readers then tell apart from a record.

- :func:`write_text_atomic`: a temporary file beside the target, then ``os.replace``: readers see the old
  content or the new one, never a part;
- :func:`append_line`: one line at the end of a store, always starting on a fresh line (a tail cut short
  by a kill is ended first, so it spoils only itself, not the new record);
- :func:`read_json_lines`: every line of a store parsed, the ones that do not parse reported with their
  number and whether it is the last line (the one a kill can cut short).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data_schemas.io import append_line  # noqa: F401 (one implementation, in the lowest layer)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` + ``os.replace`` (flushed to disk first)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object | None, str | None]]:
    """-> ``(line number, value, None)`` for each line that parses as JSON, ``(line number, None, why)``
    for one that does not (``why`` says whether it is the last line, which a kill can cut short, or one
    in the middle, which is damage). Blank lines are skipped."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw), None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            last = n == len(lines)
            what = "cut short (the last line: a write stopped by a kill)" if last else "damaged"
            yield n, None, f"{what}: {err}"
