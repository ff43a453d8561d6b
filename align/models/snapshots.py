"""Where a stage's policy snapshots live (``STAGE/snapshots/step_N/``, beside its ``model/``; written by
:mod:`align.train.snapshots`) and how to list them."""

from __future__ import annotations

import re
from pathlib import Path

SNAPSHOTS = "snapshots"
_STEP = re.compile(r"^step_(\d+)$")


def list_snapshots(model_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete snapshots beside a stage's ``model/`` folder, by step."""
    root = Path(model_dir).parent / SNAPSHOTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)
