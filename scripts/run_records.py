#!/usr/bin/env python
"""Copy what align wrote about a run (no model, no checkpoint, no answers) to a folder that outlives it:

    python scripts/run_records.py runs/smollm2_sentiment_s0 --into docs/results/runs

A run folder holds gigabytes of weights beside a few kilobytes of records; a machine that is handed back
takes both. The copy ``INTO/<run name>/`` keeps, for every finished stage (one whose ``result.json`` exists),
its records: ``stage.json``, ``result.json``, ``metrics.json``, ``metrics.jsonl`` and ``snapshots.jsonl``
(none over 1 MB); no data (answers, samples, pairs: they quote the prompts' source text), no model, no
checkpoint. And the run's ``resolved.yaml`` (the recipe as run; ``resolved.running.yaml`` when the run was cut short) and report. The
readers of run folders (``eval/frontier.py``, ``scripts/results.py``, the notebooks) read the copy the same
way. A run made in parts adds up: stages already in the copy and not in the run folder stay. Every copy
appends a line to ``records.jsonl`` there: when, from where, on which CPU, which stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

KEEP = ("stage.json", "result.json", "metrics.json", "metrics.jsonl", "snapshots.jsonl")
MAX_BYTES = 1 << 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_stage(stage_dir: Path, dest: Path) -> None:
    """The stage's record files (top level only: its subfolders hold models, checkpoints, logs)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(stage_dir.iterdir()):
        if f.is_file() and f.name in KEEP and f.stat().st_size <= MAX_BYTES:
            shutil.copy2(f, dest / f.name)


def copy_run(run_dir: Path, into: Path) -> dict:
    out = into / run_dir.name
    stages = []
    for round_dir in sorted(run_dir.glob("round_*")):
        for stage_dir in sorted(p for p in round_dir.iterdir() if p.is_dir() and "." not in p.name):
            if (stage_dir / "result.json").is_file():
                copy_stage(stage_dir, out / round_dir.name / stage_dir.name)
                stages.append(f"{round_dir.name}/{stage_dir.name}")
    resolved = run_dir / "resolved.yaml"
    running = run_dir / "resolved.running.yaml"
    if running.is_file() and (not resolved.is_file() or running.stat().st_mtime > resolved.stat().st_mtime):
        resolved = running  # cut short: the recipe it was running
    if resolved.is_file():
        shutil.copy2(resolved, out / "resolved.yaml")
    for name in ("report.json", "run.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    row = {"copied": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from": str(run_dir.resolve()),
           "cpu": cpu_name(), "cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "stages": stages}
    with open(out / "records.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (OUTPUT_DIR/NAME)")
    parser.add_argument("--into", type=Path, required=True, help="where the copies go (INTO/NAME)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not (run_dir / "resolved.yaml").is_file() and not (run_dir / "resolved.running.yaml").is_file():
            parser.error(f"{run_dir}: not a run folder (no resolved.yaml)")
        row = copy_run(run_dir, args.into)
        print(f"{run_dir} -> {args.into / run_dir.name}: {len(row['stages'])} finished stage(s)")


if __name__ == "__main__":
    main()
