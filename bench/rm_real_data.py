"""Reward model on real preference data: held-out accuracy of the reward_model stage next to a
response-length baseline (predict that the longer response wins) on the same held-out split.

Trains a tiny byte-level Llama from scratch (all we have offline) through ``align.train.reward_model``
on ../shared/data (helpful: prefs_helpful + prefs_ranked; safety: prefs_safety), held out by prompt,
for a fixed number of steps (a few minutes on 2 CPU cores), then scores the held-out records.

    python bench/rm_real_data.py                      # helpful data, ~5 minutes on 2 busy CPU cores
    python bench/rm_real_data.py --data safety --steps 200

The last line printed is JSON: accuracies of the model and of the baseline, overall and per strength.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"helpful": ["prefs_helpful.train.jsonl", "prefs_ranked.train.jsonl"], "safety": ["prefs_safety.train.jsonl"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=sorted(FILES), default="helpful")
    p.add_argument("--records", type=int, default=3000, help="records read (before the held-out split)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens (bytes) per prompt + response")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--margin", default="none", help="none, llama2_small, llama2_large")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def subset(paths: list[Path], n: int, out: Path) -> Path:
    """The first records of the files, interleaved so every file is represented."""
    per_file = [p.read_text().splitlines() for p in paths]
    rows, k = [], 0
    while len(rows) < n and any(k < len(lines) for lines in per_file):
        rows += [lines[k] for lines in per_file if k < len(lines)]
        k += 1
    out.write_text("\n".join(rows[:n]) + "\n")
    return out


def recipe(args, work: Path, data: Path) -> dict:
    heads = max(1, args.hidden // 32)
    tiny = {"hidden_size": args.hidden, "intermediate_size": -(-(args.hidden * 8 // 3) // 64) * 64,
            "num_hidden_layers": args.layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)}
    return {"name": "rm_real", "seed": args.seed, "output_dir": str(work / "runs"), "stages": [{
        "name": "rm", "kind": "reward_model", "model": {"path": "builtin:tiny", "tiny": tiny},
        "data": {"paths": [str(data)], "eval_fraction": args.eval_fraction},
        "default_domain": "safety" if args.data == "safety" else "helpfulness", "margin": args.margin,
        "stats_records": 0,  # whitening stats from the held-out records only (saves a pass)
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                  "report_to": [], "log_every": 10,
                  "optim": {"lr": args.lr, "warmup_ratio": 0.05, "weight_decay": 0.0}},
    }]}


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = [SHARED / f for f in FILES[args.data]]
    if not all(p.is_file() for p in paths):
        print(f"skipped: {SHARED} not found")
        return 0
    from align.config.recipe import recipe_from_dict
    from align.runner import run_recipe
    from eval.reward_accuracy import ranking_accuracy

    with tempfile.TemporaryDirectory(prefix="bench_rm_real_") as tmp:
        work = Path(tmp)
        data = subset(paths, args.records, work / "data.jsonl")
        t0 = time.perf_counter()
        (record,) = run_recipe(recipe_from_dict(recipe(args, work, data)), log=lambda *_: None)
        seconds = time.perf_counter() - t0
        rows = [json.loads(x) for x in open(work / "runs/rm_real/round_1/rm/eval_scores.jsonl")]
    m = record["metrics"]
    strengths, domains = [r["strength"] for r in rows], [r["domain"] for r in rows]
    lengths = [[float(len(x["content"])) for x in r["responses"]] for r in rows]
    baseline = ranking_accuracy(lengths, strengths, domains, prefix="length_")
    model = ranking_accuracy([r["scores"] for r in rows], strengths, domains)
    print(f"data: {args.data} ({', '.join(FILES[args.data])}), {int(m['train_records'])} train / "
          f"{len(rows)} held-out records (by prompt); {int(m['steps'])} steps of {args.batch_size} prompts, "
          f"max_length {args.max_length}, tiny byte-level Llama h{args.hidden} L{args.layers} from scratch; "
          f"stage took {seconds:.0f} s; train loss {m['train_loss_first']:.4f} -> {m['train_loss_last']:.4f}")
    keys = [k for k in model if k.startswith("rm_accuracy") or k == "rm_top1_accuracy"]
    for k in keys:
        base = baseline.get("length_" + k[3:])
        print(f"  {k:<36} model {model[k]:.3f}   longer-wins baseline {base:.3f}")
    print(json.dumps({
        "bench": "rm_real_data", "data": args.data, "train_records": int(m["train_records"]),
        "eval_records": len(rows), "steps": int(m["steps"]), "seconds": round(seconds, 1),
        "rm_accuracy": round(model["rm_accuracy"], 4),
        "length_baseline_accuracy": round(baseline["length_accuracy"], 4),
        "per_strength": {k.split("/", 1)[1]: [round(model[k], 4), round(baseline["length_" + k[3:]], 4)]
                         for k in keys if "/" in k and "=" not in k and k != "rm_accuracy/adjacent"},
        "train_loss_first": round(m["train_loss_first"], 4), "train_loss_last": round(m["train_loss_last"], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
