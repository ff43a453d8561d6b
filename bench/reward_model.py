"""Reward model speed and memory: align's reward_model stage vs TRL's ``RewardTrainer``, on identical work.

The same ranked 3-response records (best > middle > worst) on both sides: ours trains on them as they
are (per record the prompt once, then its 3 responses, block mask; the head on the 3 last tokens only;
at the stage's defaults: records of similar length share a micro-batch, ``train.group_by_length``, and
short records share a row, first-fit); TRL gets the equivalent pairs, 3 per record (best > middle, best > worst,
middle > worst), each pair two full rows (prompt + response) padded to the batch's longest, and runs the
head over every position. Same objective (``-log sigmoid(r_i - r_j)`` averaged over the 3 pairs of each
record == averaged over TRL's pairs), same starting weights (one saved sequence-classification
checkpoint: tiny Llama with a realistic 32k vocabulary + scalar head), same records per optimizer step
(ours ``batch_size`` records = TRL ``3 * batch_size`` pairs), AdamW (constant lr, betas 0.9/0.95, no
weight decay, grad-norm clip 1.0), fp32, no activation checkpointing. Records whose prompt + response
would exceed max_length are left out for both sides (neither truncates).

Each side runs in a fresh child process; the timed section is the training loop only (ours:
``align.train.loop.train`` inside the stage, collation included; TRL: ``trainer.train()``, dataloader
included); loading and tokenisation are excluded. Memory: the child's peak RSS on CPU (max allocated on
CUDA) and the growth during the timed section.

    python bench/reward_model.py                 # defaults: a few minutes on 2 CPU cores
    python bench/reward_model.py --data shared   # ../shared/data/prefs_ranked.train.jsonl

The last line printed is the JSON result; ``ratio`` = ours / peer records per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    emit_json,
    measure,
    pick_device,
    ratio,
    rounded,
    run_side,
    save_tiny_llama,
    write_jsonl,
)

SHARED_RANKED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prefs_ranked.train.jsonl"
PAIRS = ((0, 1), (0, 2), (1, 2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps on each side")
    p.add_argument("--batch-size", type=int, default=8, help="records per step (TRL: 3x as many pairs)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + response kept (tokens; default 512, 1024 with --data shared: with the "
                        "byte tokenizer only 33 of the shared ranked records fit 512, 124 fit 1024)")
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 64, MLP ~8/3 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="embedding rows (the byte tokenizer uses 262)")
    p.add_argument("--data", choices=["builtin", "shared"], default="builtin",
                   help="builtin: align's built-in ranked chat answers; shared: " + str(SHARED_RANKED))
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- parent: data, model, both sides


def prepare(args, work: Path) -> tuple[dict, str]:
    """Write the ranked records (ours), the pairs (TRL) and the starting reward model checkpoint."""
    from align.config.specs import ModelSpec
    from align.data.builtin import chat_preference_records
    from align.models.reward import load_reward_model, load_reward_tokenizer
    from data_schemas import read_jsonl
    from rewards.encoding import encode_prompt, encode_response

    _, desc = save_tiny_llama(work / "causal", args.hidden, args.layers, args.vocab, args.seed,
                              max_positions=max(1024, 2 * args.max_length))
    spec = ModelSpec(path=str(work / "causal"))
    tok = load_reward_tokenizer(spec, spec.path)
    load_reward_model(spec, spec.path, tok, seed=args.seed).save_pretrained(work / "init")
    tok.save_pretrained(work / "init")

    need = args.steps * args.batch_size
    if args.data == "shared":
        source = list(read_jsonl(SHARED_RANKED, "preference"))
    else:
        source = chat_preference_records(4 * need, args.seed)
    records, tokens_ours, tokens_trl = [], 0, 0
    for r in source:
        encoded = encode_prompt(tok, r.prompt)
        lengths = [len(encode_response(tok, r.prompt, x, encoded)) for x in r.responses]
        if len(r.responses) != 3 or len(encoded[1]) + max(lengths) > args.max_length:
            continue
        records.append(r)
        tokens_ours += len(encoded[1]) + sum(lengths)
        tokens_trl += sum(2 * len(encoded[1]) + lengths[i] + lengths[j] for i, j in PAIRS)
        if len(records) == need:
            break
    if len(records) < need:
        raise SystemExit(f"only {len(records)} records fit max_length {args.max_length}; need {need}")
    write_jsonl(work / "ranked.jsonl", [r.model_dump(mode="json") for r in records])
    pairs = []
    for r in records:
        prompt = [m.model_dump() for m in r.prompt]
        for i, j in PAIRS:
            pairs.append({"prompt": prompt, "chosen": [r.responses[i].model_dump()],
                          "rejected": [r.responses[j].model_dump()]})
    write_jsonl(work / "pairs.jsonl", pairs)
    stats = {"records": len(records), "tokens_ours": tokens_ours / len(records),
             "tokens_trl": tokens_trl / len(records)}
    return stats, desc + " + scalar head"


def child_argv(args, work: Path) -> list[str]:
    argv = ["--steps", args.steps, "--batch-size", args.batch_size, "--max-length", args.max_length,
            "--lr", args.lr, "--seed", args.seed, "--work", work]
    return [str(a) for a in argv]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_length is None:
        args.max_length = 1024 if args.data == "shared" else 512
    if args.side:
        side = run_ours if args.side == "ours" else run_peer
        emit_json(side(args, Path(args.work)))
        return 0
    if args.data == "shared" and not SHARED_RANKED.is_file():
        print(f"skipped: {SHARED_RANKED} not found (use --data builtin)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_rm_") as tmp:
        work = Path(tmp)
        stats, model_desc = prepare(args, work)
        print(f"model: {model_desc}; device: {pick_device()}")
        print(f"data: {args.data}, {stats['records']} ranked records (3 responses each); unpadded tokens per "
              f"record: ours {stats['tokens_ours']:.0f} (prompt once + 3 responses), TRL "
              f"{stats['tokens_trl']:.0f} (3 pairs x 2 rows)")
        print(f"work: {args.steps} steps x {args.batch_size} records (TRL: {3 * args.batch_size} pairs), "
              f"AdamW lr {args.lr} constant, fp32; timed: the training loop only")
        results = {side: run_side(__file__, child_argv(args, work), side, echo=args.verbose)
                   for side in ("ours", "peer")}
    ours, peer = results["ours"], results["peer"]
    for name, r in (("ours (align reward_model stage)", ours), ("peer (trl.RewardTrainer)", peer)):
        print(f"{name}: {r['records']} records in {r['steps']} steps, {r['seconds']:.2f} s -> "
              f"{r['records_per_s']:.2f} records/s; loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}; "
              f"peak {r['peak_mb']:.0f} MB ({r['memory']}), +{r['delta_mb']:.0f} MB while timed")
    emit_json({
        "bench": "reward_model",
        "ours": rounded(ours["records_per_s"]),
        "peer": rounded(peer["records_per_s"]),
        "unit": "records/s",
        "ratio": rounded(ratio(ours["records_per_s"], peer["records_per_s"])),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "peer_peak_mb": round(peer["peak_mb"], 1),
        "ours_train_delta_mb": round(ours["delta_mb"], 1),
        "peer_train_delta_mb": round(peer["delta_mb"], 1),
        "ours_final_loss": rounded(ours["final_loss"]),
        "peer_final_loss": rounded(peer["final_loss"]),
        "steps": args.steps,
        "model": model_desc,
        "config": f"{args.data} data, {args.batch_size} records/step, max_length {args.max_length}, "
                  f"device {ours['device']}",
    })
    return 0


# ---------------------------------------------------------------- side: ours


def run_ours(args, work: Path) -> dict:
    """The reward_model stage through ``run_stage`` (in this process); its training loop is wrapped (observed, not
    changed) to time it and count the records it sees."""
    import align.train.fit as fit
    from align.config.recipe import recipe_from_dict
    from align.runner import run_stage
    from align.train.metrics import read_metrics

    init = str(work / "init")
    recipe = recipe_from_dict({
        "name": "bench_rm", "seed": args.seed, "output_dir": str(work / "runs"),
        "stages": [{"name": "rm", "kind": "reward_model", "model": {"path": init}, "stats_records": 0,
                    "data": {"paths": [str(work / "ranked.jsonl")]},
                    "train": {"max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                              "save_every": 0, "log_every": 1, "report_to": [],
                              "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0,
                                        "weight_decay": 0.0, "betas": [0.9, 0.95], "max_grad_norm": 1.0}}}],
    })
    device, probe, real_train = pick_device(), {"records": 0}, fit.train

    def timed_train(**kwargs):
        source = kwargs["source"]
        make_batch = source.make_batch

        def counting(group):
            batch = make_batch(group)
            probe["records"] += batch.num_prompts
            return batch

        source.make_batch = counting
        with measure(device) as m:
            probe["summary"] = real_train(**kwargs)
        probe["m"] = m
        return probe["summary"]

    fit.train = timed_train  # fit's call of the loop
    try:
        run_stage(recipe, recipe.stages[0].name, 1, "bench")
    finally:
        fit.train = real_train
    m = probe["m"]
    losses = [r["train/loss"] for r in read_metrics(recipe.run_dir / "round_1" / "rm") if "train/loss" in r]
    return {"side": "ours", "device": device, "steps": probe["summary"].steps, "records": probe["records"],
            "records_per_s": probe["records"] / m.seconds, "first_loss": losses[0], "final_loss": losses[-1],
            **m.as_dict(), "seconds": m.seconds}


# ---------------------------------------------------------------- side: peer (TRL)


def run_peer(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    class CountingRewardTrainer(RewardTrainer):
        bench_pairs = 0

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                self.bench_pairs += int(inputs["input_ids"].shape[0]) // 2
            return super().compute_loss(model, inputs, *a, **kw)

    device = pick_device()
    init = str(work / "init")
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init, dtype=torch.float32)
    rows = [json.loads(x) for x in open(work / "pairs.jsonl")]
    config = RewardConfig(
        output_dir=str(work / "trl_out"), seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=3 * args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        max_length=args.max_length, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=device == "cpu", dataloader_num_workers=0, save_strategy="no", eval_strategy="no",
        logging_steps=1, report_to="none",
    )
    trainer = CountingRewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    with measure(device) as m:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    records = trainer.bench_pairs / len(PAIRS)
    return {"side": "peer", "device": device, "steps": trainer.state.global_step, "records": records,
            "records_per_s": records / m.seconds, "first_loss": losses[0], "final_loss": losses[-1],
            **m.as_dict(), "seconds": m.seconds}


if __name__ == "__main__":
    sys.exit(main())
