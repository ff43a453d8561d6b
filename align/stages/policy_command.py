"""``align eval policy``: the evaluation stage on one checkpoint from the command line. Importing this
module imports no torch (the CLI's other commands stay fast); the work is imported when the command runs."""

from __future__ import annotations

import json


def add_command(subparsers) -> None:
    """``align eval policy``"""
    p = subparsers.add_parser(
        "policy", help="generate on held-out prompts and report gold metrics, RM scores and KL",
        description="Evaluate a policy checkpoint: greedy answers to held-out prompts (default: the built-in "
        "world's evaluation prompts), judged by the world's gold judge when the prompts are world prompts; "
        "optionally reward-model scores and KL to a reference. Prints the metrics as JSON on the last line.",
    )
    p.add_argument("--model", required=True, help="policy checkpoint (HF folder or hub id)")
    p.add_argument("--prompts", help="prompt file (JSONL: prompt records or any preference/SFT file)")
    p.add_argument("--n", type=int, default=600, help="number of built-in evaluation prompts (default 600)")
    p.add_argument("--reference", help="reference policy for kl_to_reference")
    p.add_argument("--reward-model", action="append", default=[], metavar="NAME=PATH",
                   help="a reward model to score the answers with (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    p.add_argument("--evaluator", action="append", metavar="NAME",
                   help="an evaluator of the answers: a plug-in's name or package.module:name (repeatable; "
                   "default: world, the built-in world's gold judge)")
    p.add_argument("--out", help="also write the answers to this JSONL file")
    p.set_defaults(func=_cmd_policy)


def _cmd_policy(args) -> int:
    from align.config.sampling import SamplingParams
    from align.config.specs import DataSpec
    from align.data.sources import load_prompts
    from align.evaluators import load_evaluators
    from align.stages.evaluation import answers, evaluate
    from data_schemas import write_jsonl

    spec = DataSpec(paths=[args.prompts]) if args.prompts else DataSpec(builtin="world_eval", builtin_size=args.n)
    prompts = load_prompts(spec, spec.paths, seed=0)
    rms = dict(item.split("=", 1) for item in args.reward_model)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)
    evaluators = load_evaluators(args.evaluator or ["world"])
    metrics, responses = evaluate(args.model, prompts, reference_path=args.reference, reward_models=rms,
                                  sampling=sampling, evaluators=evaluators)
    if args.out:
        write_jsonl(args.out, answers(prompts, responses, evaluators))
    for k, v in metrics.items():
        print(f"{k:>28}: {v:.4f}")
    print(json.dumps(metrics))
    return 0
