#!/usr/bin/env python
"""Write ``docs/results/<recipe>.md`` from finished run folders. The pages are generated: rerun this, never
edit their numbers by hand.

    python scripts/results.py runs/llama3_round* --out docs/results

Each RUN_DIR holds ``report.json`` (``align/report.py``: every stage's metrics) and ``resolved.yaml`` (the
recipe as run, with its name and seed). Folders are grouped by recipe (the run's name with a trailing
``_s<N>`` / ``_seed<N>`` taken off, or ``--recipe``), one page per recipe. One folder gives a column of
values; several (seeds) give a column per folder, then the median and the range.

The page's header says where the numbers come from:

1. the commit: ``git rev-parse HEAD`` of this checkout, marked "+ uncommitted changes" when tracked files
   differ from it (``--commit`` when the runs were made from another checkout; run folders hold no commit);
2. the machine: this machine's CPU model, cores and OMP_NUM_THREADS (``--machine`` when run elsewhere);
3. the command that makes each run, and the date its report was written.

Then the tables: the headline metrics by stage (by round for recipes with several rounds), then every
metric of every stage. No torch, no align import: it reads JSON and YAML only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# (label, metric key): the rows of the headline table, for the stages that have them
HEADLINE = [
    ("gold helpfulness", "gold_helpfulness"),
    ("violation rate", "safety_violation_rate"),
    ("over-refusal", "over_refusal_rate"),
    ("KL to reference", "kl_to_reference"),
    ("RM accuracy", "rm_accuracy"),
    ("RM length baseline", "rm_accuracy_length_baseline"),
    ("DPO held-out reward accuracy", "eval_reward_accuracy"),
    ("RS gold of kept samples", "gold_best_mean"),
    ("RS gold of all samples", "gold_sample_mean"),
    ("RS: its reward's pair accuracy on its samples", "gold_reward_accuracy"),
    ("RS: last round's reward on them", "gold_compare_reward_accuracy"),
    ("task accuracy over the dialogue", "retention/task_mean"),
    ("judge score (VADER sentiment)", "sentiment"),
    ("RS judge score of kept samples", "sentiment_best_mean"),
    ("answers repeating a word 3x", "word_repeat_rate"),
    ("distinct-2", "distinct_2"),
]
SEED_SUFFIX = re.compile(r"_(s|seed)\d+$")


@dataclass
class Run:
    folder: Path
    name: str       # the run's name (resolved.yaml), e.g. llama3_round_s1
    recipe: str     # the recipe file's stem, e.g. llama3_round
    seed: int | None
    records: list[dict]
    label: str = ""

    @property
    def command(self) -> str:
        cmd = f"align run recipes/{self.recipe}.yaml"
        if self.seed is not None:
            cmd += f" seed={self.seed}"
        return cmd + (f" name={self.name}" if self.name != self.recipe else "")


def read_run(folder: Path, recipe: str | None = None) -> Run:
    report = folder / "report.json"
    if not report.is_file():
        raise SystemExit(f"{report}: no report (has `align run` finished in this folder?)")
    resolved = folder / "resolved.yaml"
    spec = yaml.safe_load(resolved.read_text()) if resolved.is_file() else {}
    name = spec.get("name") or folder.name
    return Run(folder, name, recipe or SEED_SUFFIX.sub("", name), spec.get("seed"),
               json.loads(report.read_text()))


def label_runs(runs: list[Run]) -> None:
    """Columns are "seed N"; the folder name is added where two runs share a seed (or have none)."""
    seeds = [r.seed for r in runs]
    for r in runs:
        unique = r.seed is not None and seeds.count(r.seed) == 1
        r.label = f"seed {r.seed}" if unique else f"seed {r.seed} ({r.folder.name})"


# -- the header ------------------------------------------------------------------------------------------


def git_commit(repo: Path = REPO) -> str:
    """HEAD of ``repo``, "+ uncommitted changes" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; pass --commit)"
    return head + (" + uncommitted changes" if dirty else "")


def machine(cpuinfo: str | None = None, cores: int | None = None, threads: str | None = None) -> str:
    """CPU model (family, model and widest vector unit on x86), cores, OMP_NUM_THREADS."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']}, model {fields.get('model', '?')}")
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    if vector:
        details.append(vector)
    cores = cores if cores is not None else os.cpu_count()
    threads = threads if threads is not None else os.environ.get("OMP_NUM_THREADS")
    return (f"{model}" + (f" ({', '.join(details)})" if details else "") + f", {cores} cores, "
            + (f"OMP_NUM_THREADS={threads}" if threads else "OMP_NUM_THREADS unset"))


def run_date(run: Run) -> str:
    return date.fromtimestamp((run.folder / "report.json").stat().st_mtime).isoformat()


# -- the tables ------------------------------------------------------------------------------------------


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if float(v).is_integer() or abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}"


def spread(values: list) -> list[str]:
    """-> [median, range] over the numbers present (blank with fewer than two)."""
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) < 2:
        return ["", ""]
    return [fmt(statistics.median(nums)), f"{fmt(min(nums))}–{fmt(max(nums))}"]


def stages(runs: list[Run]) -> list[tuple[int, str, str]]:
    """(round, stage, kind) of every run, in run order."""
    seen: dict[tuple[int, str], str] = {}
    for run in runs:
        for r in run.records:
            seen.setdefault((r["round"], r["stage"]), r["kind"])
    return [(rnd, stage, kind) for (rnd, stage), kind in seen.items()]


def metric(run: Run, round_: int, stage: str, key: str):
    for r in run.records:
        if r["round"] == round_ and r["stage"] == stage:
            return r.get("stage_seconds") if key == "stage_seconds" else r["metrics"].get(key)
    return None


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def value_cells(runs: list[Run], round_: int, stage: str, key: str) -> list[str]:
    values = [metric(run, round_, stage, key) for run in runs]
    return [fmt(v) for v in values] + (spread(values) if len(runs) > 1 else [])


def seed_columns(runs: list[Run]) -> list[str]:
    return [r.label for r in runs] + (["median", "range"] if len(runs) > 1 else [])


def headline(runs: list[Run]) -> list[str]:
    """By stage: the metrics that matter, a column per seed (one round), or a column per round (the median
    over seeds, with their range) for recipes with several rounds."""
    all_stages = stages(runs)
    rounds = sorted({rnd for rnd, _, _ in all_stages})
    rows = []
    if len(rounds) == 1:
        for rnd, stage, _ in all_stages:
            for label, key in HEADLINE:
                cells = value_cells(runs, rnd, stage, key)
                if any(cells[: len(runs)]):
                    rows.append([stage, label, *cells])
        return table(["stage", "metric", *seed_columns(runs)], rows)
    names = list(dict.fromkeys(stage for _, stage, _ in all_stages))
    for stage in names:
        for label, key in HEADLINE:
            cells = []
            for rnd in rounds:
                values = [metric(run, rnd, stage, key) for run in runs]
                nums = [v for v in values if isinstance(v, int | float)]
                low_high = f" ({fmt(min(nums))}–{fmt(max(nums))})" if len(nums) > 1 else ""
                cells.append(fmt(statistics.median(nums)) + low_high if nums else "")
            if any(cells):
                rows.append([stage, label, *cells])
    return table(["stage", "metric", *[f"round {r}" for r in rounds]], rows)


def every_metric(runs: list[Run]) -> list[str]:
    lines: list[str] = []
    all_stages = stages(runs)
    several_rounds = len({rnd for rnd, _, _ in all_stages}) > 1
    current = None
    for rnd, stage, kind in all_stages:
        if several_rounds and rnd != current:
            lines += ["", f"### Round {rnd}"]
            current = rnd
        keys = sorted({k for run in runs for r in run.records
                       if r["round"] == rnd and r["stage"] == stage for k in r["metrics"]})
        rows = [[k, *value_cells(runs, rnd, stage, k)] for k in keys]
        if any(metric(run, rnd, stage, "stage_seconds") is not None for run in runs):
            rows.append(["stage seconds", *value_cells(runs, rnd, stage, "stage_seconds")])
        if rows:
            lines += ["", f"{'####' if several_rounds else '###'} {stage} ({kind})", "",
                      *table(["metric", *seed_columns(runs)], rows)]
    return lines


def page(runs: list[Run], commit: str, machine_text: str) -> str:
    recipe = runs[0].recipe
    lines = [f"# Results: `recipes/{recipe}.yaml`", "",
             "Generated by `scripts/results.py` from the run folders below; regenerate it, do not edit it.", "",
             *table(["", ""], [
                 ["commit", f"`{commit}`"],
                 ["machine", machine_text],
                 ["command", "<br>".join(f"`{r.command}`" for r in runs)],
                 ["runs", "<br>".join(f"{r.label}: `{r.folder}`, report of {run_date(r)}" for r in runs)],
             ]),
             "", "## Headline", "", *headline(runs),
             "", "## Every metric, by stage", *every_metric(runs)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with report.json)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="folder of the pages")
    p.add_argument("--recipe", help="the recipe of every folder given (default: from each run's name)")
    p.add_argument("--commit", help="the commit the runs were made at (default: this checkout's HEAD)")
    p.add_argument("--machine", help="the machine the runs were made on (default: this one)")
    args = p.parse_args(argv)
    groups: dict[str, list[Run]] = {}
    for folder in args.runs:
        run = read_run(folder, args.recipe)
        groups.setdefault(run.recipe, []).append(run)
    commit = args.commit or git_commit()
    machine_text = args.machine or machine()
    args.out.mkdir(parents=True, exist_ok=True)
    for recipe, runs in groups.items():
        runs.sort(key=lambda r: (r.seed is None, r.seed or 0, str(r.folder)))
        label_runs(runs)
        path = args.out / f"{recipe}.md"
        path.write_text(page(runs, commit, machine_text))
        print(f"{path}: {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
