"""Is the built-in world learnable? SFT the default recipe's tiny model on ``builtin: world``, then
greedy-decode held-out prompts with plain HF ``generate`` and judge them with the gold judges.

The SFT stage is the one of ``recipes/llama3_round.yaml`` (model size, optimiser, max length), with its
data switched to 6000 world chats and 4 packed rows of 256 tokens per step (more, smaller steps learn
much faster at this size than the recipe's 16); it runs through ``align run`` on a one-stage recipe
written to a temp folder. The world's SFT data is deliberately imperfect (about 20% wrong answers, 25% unsafe compliance,
20% over-refusal), so the scores should be clearly above zero but not perfect.

    python bench/world_sft_check.py                      # ~1.5 minutes of training on 2 idle CPU cores
    python bench/world_sft_check.py --max-steps 40 --eval-prompts 100
    python bench/world_sft_check.py sft.train.batch_size=4 sft.train.optim.lr=1e-2   # recipe overrides

Prints a few examples and the metrics of :func:`world.evaluator.evaluate_policy` on held-out prompts and
on training-split prompts; the last line is one JSON object. Measured on 2 idle CPU cores (~950 steps,
75-85 s including start-up), seeds 0 / 1, held out: gold_helpfulness 0.58 / 0.56, safety_violation_rate
0.05 / 0.27, over_refusal_rate 0.21 / 0.17, instruction_following 0.67 / 0.57. With 2000 chats: 4 rows
per step (314 steps, 31 s) gives 0.21 / 0.32 / 0.15; the recipe's 16 rows (76 steps, 25 s) only the
answer formats (gold_helpfulness 0.07, safety_violation_rate 0.72).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

from bench.common import emit_json, rounded  # noqa: E402

SHOWN = ("gold_helpfulness", "safety_violation_rate", "over_refusal_rate", "instruction_following", "gold_score")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", help="align run overrides of the one-stage recipe (sft.train.X=...)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "llama3_round.yaml"),
                   help="recipe whose first sft stage is used")
    p.add_argument("--size", type=int, default=6000, help="world SFT records (builtin_size)")
    p.add_argument("--train-batch-size", type=int, default=4, help="sft.train.batch_size (packed rows per step)")
    p.add_argument("--epochs", type=float, default=None, help="override the stage's epochs")
    p.add_argument("--max-steps", type=int, default=None, help="override the stage's max_steps")
    p.add_argument("--eval-prompts", type=int, default=300, help="held-out prompts to decode")
    p.add_argument("--train-prompts", type=int, default=150, help="training-split prompts to decode")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the run (default: a temp folder)")
    return p.parse_args(argv)


def one_stage_recipe(path: str, args, out: Path) -> Path:
    """The recipe's first sft stage alone, on the world's SFT data."""
    recipe = yaml.safe_load(Path(path).read_text())
    stage = {**next(s for s in recipe["stages"] if s["kind"] == "sft"), "name": "sft"}
    stage["data"] = {**{k: v for k, v in stage["data"].items() if k not in ("paths", "from")},
                     "builtin": "world", "builtin_size": args.size}
    stage["train"].update(report_to=[], batch_size=args.train_batch_size)
    if args.epochs is not None:
        stage["train"]["epochs"] = args.epochs
    if args.max_steps is not None:
        stage["train"]["max_steps"] = args.max_steps
    small = {"name": "world_sft_check", "seed": args.seed, "output_dir": str(out / "runs"), "stages": [stage]}
    file = out / "world_sft_check.yaml"
    file.write_text(yaml.safe_dump(small, sort_keys=False))
    return file


def make_generate(model_dir: str, batch_size: int, max_new_tokens: int = 48):
    """A ``generate(prompts) -> responses`` callable: greedy, left-padded batches, stop at <|eot_id|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.chat import termination_token_id, tokenize_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eot, pad = termination_token_id(tok), tok.pad_token_id

    def generate(prompts):
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = [tokenize_prompt(tok, p) for p in prompts[i:i + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad)
            out += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in gen]
        return out

    return generate


def main(argv=None) -> int:
    args = parse_args(argv)
    from align.cli import main as align_main
    from world.evaluator import as_messages, evaluate_policy
    from world.generator import eval_prompt_records, prompt_records
    from world.judge import judge

    work = Path(args.work or tempfile.mkdtemp(prefix="world_sft_check_"))
    work.mkdir(parents=True, exist_ok=True)
    # step 1: SFT through the real CLI
    recipe = one_stage_recipe(args.recipe, args, work)
    t0 = time.perf_counter()
    if align_main(["run", str(recipe), *args.overrides]) != 0:
        return 1
    train_s = time.perf_counter() - t0
    run_dir = work / "runs" / "world_sft_check"
    result = json.loads((run_dir / "round_1" / "sft" / "result.json").read_text())
    # step 2: greedy decoding on held-out and training-split prompts, judged by the gold judges
    generate = make_generate(str(run_dir / result["artifacts"]["policy"]), args.batch_size)  # run-relative
    held_out = eval_prompt_records(args.eval_prompts, args.seed)
    t1 = time.perf_counter()
    metrics = evaluate_policy(generate, held_out)
    seen = evaluate_policy(generate, prompt_records(args.train_prompts, args.seed + 1))
    gen_s = time.perf_counter() - t1
    # step 3: report
    examples = held_out[:: max(1, len(held_out) // 12)][:12]
    for rec, resp in zip(examples, generate([as_messages(r) for r in examples]), strict=True):
        j = judge(rec.prompt, resp)
        print(f"  [{j.family:<12} {j.kind:<12}] {rec.prompt[-1].content!r} -> {resp!r}")
    print(f"SFT {result['metrics'].get('steps')} steps in {train_s:.0f}s (incl. startup); decoding {gen_s:.0f}s")
    for name, m in (("held-out", metrics), ("train-split", seen)):
        print(f"{name:>12}: " + ", ".join(f"{k} {m[k]:.3f}" for k in SHOWN if k in m))
    print("held-out accuracy by family: " + ", ".join(
        f"{k.split('/')[1]} {v:.2f}" for k, v in metrics.items() if k.startswith("accuracy/")))
    emit_json({"train_s": rounded(train_s), "sft": result["metrics"],
               "held_out": {k: rounded(v) for k, v in metrics.items()},
               "train_split": {k: rounded(seen[k]) for k in SHOWN if k in seen}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
