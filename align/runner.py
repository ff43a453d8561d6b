"""Run a recipe: stages in order, each in ``runs/<name>/round_<k>/<stage>/``.

A stage whose ``result.json`` carries the same fingerprint (its config, the seed, its upstream stages'
fingerprints and the content of its input files) is skipped. A stage folder whose fingerprint differs
is cleared and the stage rerun; a stage that was interrupted resumes from its latest checkpoint.
A stage with ``launch.num_processes > 1`` runs in child processes (torchrun, or ``accelerate launch``
with the given config); otherwise it runs in this process.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from align.config.recipe import Recipe, dump_recipe, load_recipe
from align.runtime import StageContext, StageResult, read_result, write_result

STAGE_MODULES = {"sft": "align.train.sft", "dpo": "align.train.dpo", "reward_model": "align.train.reward_model",
                 "model_average": "align.stages.model_average",
                 "rejection_sampling": "align.stages.rejection_sampling", "evaluate": "align.stages.evaluation"}
VERSION = "0.1.0"


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


def stage_dir(recipe: Recipe, round_: int, name: str) -> Path:
    return recipe.run_dir / f"round_{round_}" / name


def _view(per_round: dict[int, dict], round_: int) -> dict:
    """What a stage of ``round_`` can refer to: ``prev.NAME``, the latest run of NAME in an earlier round;
    ``NAME``, its run in this round, or its latest earlier run when it does not run in this round."""
    view = {}
    for r in sorted(k for k in per_round if k < round_):
        for name, value in per_round[r].items():
            view[f"prev.{name}"] = view[name] = value
    view.update(per_round.get(round_, {}))
    return view


def run_stage_here(recipe: Recipe, stage, round_: int, history: dict[int, dict[str, StageResult]]) -> StageResult:
    module = importlib.import_module(STAGE_MODULES[stage.kind])
    ctx = StageContext(
        recipe=recipe, round=round_, out_dir=stage_dir(recipe, round_, stage.name),
        upstream=_view(history, round_),
        history={r: v for r, v in history.items() if r < round_},
    )
    return module.run(stage, ctx)


def _launch_children(recipe_file: Path, stage, round_: int) -> None:
    n = stage.launch.num_processes
    entry = ["-m", "align.runner", "--recipe", str(recipe_file), "--stage", stage.name, "--round", str(round_)]
    if stage.launch.accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               stage.launch.accelerate_config, "--num_processes", str(n), *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *entry]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_recipe(recipe: Recipe, log=print) -> list[dict]:
    """Run every stage of every round; returns the report records."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "resolved.yaml"
    resolved.write_text(dump_recipe(recipe))
    records, worked = [], False
    history: dict[int, dict[str, StageResult]] = {}
    all_fps: dict[int, dict[str, str]] = {}
    for round_ in range(1, recipe.rounds + 1):
        results = history.setdefault(round_, {})
        fps = all_fps.setdefault(round_, {})
        for stage in recipe.stages:
            if stage.in_rounds is not None and round_ not in stage.in_rounds:
                continue
            out = stage_dir(recipe, round_, stage.name)
            fp = fingerprint(recipe, stage, round_, _view(all_fps, round_))
            old_fp, old = read_result(out)
            t0 = time.perf_counter()
            if old_fp == fp:
                log(f"[round {round_}] {stage.name}: up to date, skipped")
                result, skipped = old, True
            else:
                marker = out / "stage.json"
                if out.exists() and (not marker.exists() or json.loads(marker.read_text())["fingerprint"] != fp):
                    shutil.rmtree(out)  # made by another config: start clean
                out.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"fingerprint": fp, "kind": stage.kind}))
                log(f"[round {round_}] {stage.name} ({stage.kind}): running")
                if stage.launch.num_processes > 1:
                    _launch_children(resolved, stage, round_)
                    _, result = read_result(out)
                else:
                    result = run_stage_here(recipe, stage, round_, history)
                    write_result(out, result, fp)
                gc.collect()
                skipped, worked = False, True
            results[stage.name], fps[stage.name] = result, fp
            records.append({
                "round": round_, "stage": stage.name, "kind": stage.kind, "metrics": result.metrics,
                "artifacts": result.artifacts, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1),
            })
    if not worked:
        log("nothing to do: every stage is up to date")
    write_report(run_dir, recipe, records)
    return records


def write_report(run_dir: Path, recipe: Recipe, records: list[dict]) -> None:
    (run_dir / "report.json").write_text(json.dumps(records, indent=1))
    keys = sorted({k for r in records for k in r["metrics"]})
    lines = [f"# {recipe.name}", "", "| round | stage | kind | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in records:
        cells = []
        for k in keys:
            v = r["metrics"].get(k)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append(f"| {r['round']} | {r['stage']} | {r['kind']} | " + " | ".join(cells) + " |")
    lines += ["", "Artifacts:", ""]
    lines += [f"- round {r['round']} {r['stage']}: {a}: `{p}`" for r in records for a, p in r["artifacts"].items()]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def _child_main(argv=None) -> None:
    """Entry of a stage's child processes (``python -m align.runner``)."""
    p = argparse.ArgumentParser(description="run one stage of a resolved recipe (used by align run)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--round", type=int, default=1)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    history: dict[int, dict[str, StageResult]] = {}
    all_fps: dict[int, dict[str, str]] = {}
    for round_ in range(1, args.round + 1):
        for stage in recipe.stages:
            if stage.in_rounds is not None and round_ not in stage.in_rounds:
                continue
            fps = all_fps.setdefault(round_, {})
            fp = fingerprint(recipe, stage, round_, _view(all_fps, round_))
            if round_ == args.round and stage.name == args.stage:
                result = run_stage_here(recipe, stage, round_, history)
                if int(os.environ.get("RANK", "0")) == 0:
                    write_result(stage_dir(recipe, round_, stage.name), result, fp)
                return
            _, history.setdefault(round_, {})[stage.name] = read_result(stage_dir(recipe, round_, stage.name))
            fps[stage.name] = fp


if __name__ == "__main__":
    _child_main()
