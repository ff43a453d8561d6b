"""``align data world``: write the built-in world's data sets to files (the plug-in's ``data_command``)."""

from __future__ import annotations

import json
from pathlib import Path

from data_schemas import write_jsonl
from world.evaluator import world_metrics
from world.generator import SOURCE, eval_prompt_records, preference_records, prompt_records, sft_records
from world.tasks import FAMILIES

SIZES = {
    "small": {"sft": 200, "prefs_helpful": 120, "prefs_safety": 120, "prompts": 100, "eval_prompts": 80},
    "default": {"sft": 2000, "prefs_helpful": 1500, "prefs_safety": 1500, "prompts": 1000, "eval_prompts": 300},
}


def write_world(out_dir: str | Path, seed: int = 0, size: str = "default") -> dict:
    """Write sft.jsonl, prefs_helpful.jsonl, prefs_safety.jsonl, prompts.jsonl, eval_prompts.jsonl and
    world.json (counts, and the gold quality of the SFT data); returns the world.json content."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    n, out = SIZES[size], Path(out_dir)
    sft = sft_records(n["sft"], seed)
    files = {
        "sft.jsonl": sft,
        "prefs_helpful.jsonl": preference_records(n["prefs_helpful"], seed, "helpfulness"),
        "prefs_safety.jsonl": preference_records(n["prefs_safety"], seed, "safety"),
        "prompts.jsonl": prompt_records(n["prompts"], seed),
        "eval_prompts.jsonl": eval_prompt_records(n["eval_prompts"], seed),
    }
    counts = {name: write_jsonl(out / name, records) for name, records in files.items()}
    last_turns = [(r.conversation()[:-1], r.messages[-1].content) for r in sft]
    info = {"seed": seed, "size": size, "source": SOURCE, "counts": counts,
            "families": sorted(FAMILIES),
            "sft_gold": {k: round(v, 4) for k, v in world_metrics(*zip(*last_turns, strict=True)).items()}}
    (out / "world.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def add_command(subparsers) -> None:
    """``align data world --out DIR [--seed N] [--size small|default]``."""
    p = subparsers.add_parser(
        "world", help="write the built-in world's data (SFT, preferences, prompt pools, eval prompts)",
        description="Write the built-in world's data sets, judged by its gold judges: " + ", ".join(
            f"{k} ({v} records)" for k, v in SIZES["default"].items()) + " at --size default.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="record counts (default: default)")
    p.set_defaults(func=_cmd_world, check=_check_world)


def _check_world(args) -> list[str]:
    """Problems with the arguments, one line each (``align`` prints them before the command runs)."""
    out = Path(args.out).expanduser()
    blocker = next((f for f in [out, *out.parents] if f.exists() and not f.is_dir()), None)
    return [f"--out: {blocker} is a file, not a folder"] if blocker is not None else []


def _cmd_world(args) -> int:
    info = write_world(args.out, args.seed, args.size)
    for name, count in info["counts"].items():
        print(f"{Path(args.out) / name}: {count} records")
    gold = info["sft_gold"]
    print(f"sft.jsonl gold quality (last turns): helpfulness {gold['gold_helpfulness']:.2f}, "
          f"violations {gold['safety_violation_rate']:.2f}, over-refusals {gold['over_refusal_rate']:.2f}")
    return 0
