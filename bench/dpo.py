"""DPO speed and memory: align's DPO stage vs TRL's ``DPOTrainer``, on identical work.

Both sides start from the same saved weights (a tiny Llama with a realistic 32k vocabulary), read the same
preference pairs (a JSONL file in TRL's prompt/chosen/rejected format), and train one epoch over them with
the same objective (sigmoid DPO, beta 0.1, + 0.2 x NLL on the chosen response; our formatting-token mask
is off so that the sums are the same), batch size, max length (prompt + response, start kept), and AdamW
(constant lr, betas 0.9/0.95, no weight decay, grad-norm clip 1.0), in fp32, no activation checkpointing.

The reference pass is counted on both sides: each computes the reference log-probs of the epoch's pairs
once (ours: the stage's reference pass with a fresh cache, so it is computed, not read back; TRL:
``precompute_ref_log_probs=True``), and the throughput is pairs / (reference pass + training loop).
Model loading, tokenisation and saving are excluded on both sides. Each side runs in a fresh child
process; memory is the child's peak RSS on CPU (max allocated on CUDA), and the growth during the timed
sections (``delta``).

    python bench/dpo.py                       # defaults: a few minutes on 2 CPU cores
    python bench/dpo.py --data builtin --pairs 64

The last line printed is the JSON result; ``ratio`` = ours / peer pairs per second.
"""

from __future__ import annotations

import argparse
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

SHARED_PREFS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prefs_helpful.train.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="preference pairs in the epoch (a multiple of batch-size)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="prompt + response cut to this many tokens")
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 64, MLP ~8/3 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000,
                   help="model vocabulary (embedding + LM head rows); the byte tokenizer uses 262 of them")
    p.add_argument("--data", choices=["shared", "builtin"], default="shared",
                   help=f"shared: {SHARED_PREFS} (falls back to builtin when absent); builtin: align's "
                   "generated chat preferences (short prompts and answers)")
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate on both sides")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on both sides (align's train.mixed_precision, TRL's bf16=True); for GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- parent: data, model, both sides


def prepare_data(args, path: Path) -> dict:
    """Write ``args.pairs`` chosen/rejected rows whose prompt leaves room for a response within max_length
    (both sides would drop the others)."""
    from align.data.builtin import chat_preference_records
    from align.data.chat import build_byte_tokenizer
    from align.data.encode import encode_preference
    from data_schemas import read_jsonl

    tok = build_byte_tokenizer()
    if args.data == "shared":
        records = read_jsonl(SHARED_PREFS, "preference")
    else:
        records = chat_preference_records(4 * args.pairs, args.seed)
    rows, prompt_tokens, response_tokens = [], 0, 0
    for r in records:
        encoded, _ = encode_preference(tok, r, keep=[0, len(r.responses) - 1], truncation="cut_end")
        p_ids, (c_ids, j_ids) = encoded.prompt_ids, encoded.responses
        room = args.max_length - len(p_ids)
        if room < 8:
            continue
        prompt_tokens += len(p_ids)
        response_tokens += min(room, len(c_ids)) + min(room, len(j_ids))
        rows.append({"prompt": [m.model_dump() for m in r.prompt],
                     "chosen": [r.chosen.model_dump()], "rejected": [r.rejected.model_dump()]})
        if len(rows) == args.pairs:
            break
    if len(rows) < args.pairs:
        raise SystemExit(f"only {len(rows)} usable pairs in {args.data} data; lower --pairs")
    write_jsonl(path, rows)
    return {"pairs": len(rows), "prompt_tokens": prompt_tokens / len(rows),
            "response_tokens": response_tokens / (2 * len(rows))}


def child_argv(args, work: Path) -> list[str]:
    argv = ["--pairs", args.pairs, "--batch-size", args.batch_size, "--max-length", args.max_length,
            "--lr", args.lr, "--seed", args.seed, "--precision", args.precision, "--work", work]
    return [str(a) for a in argv]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        side = run_ours if args.side == "ours" else run_peer
        emit_json(side(args, Path(args.work)))
        return 0
    if args.pairs % args.batch_size:
        raise SystemExit("--pairs must be a multiple of --batch-size (one epoch of whole steps on both sides)")
    if args.data == "shared" and not SHARED_PREFS.is_file():
        print(f"{SHARED_PREFS} not found: using the builtin preferences")
        args.data = "builtin"
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        work = Path(tmp)
        stats = prepare_data(args, work / "pairs.jsonl")
        _, model_desc = save_tiny_llama(work / "init", args.hidden, args.layers, args.vocab, args.seed,
                                        max_positions=max(1024, 2 * args.max_length))
        print(f"model: {model_desc}; device: {pick_device()}")
        print(f"data: {args.data}, {stats['pairs']} pairs, {stats['prompt_tokens']:.0f} prompt tokens and "
              f"{stats['response_tokens']:.0f} response tokens (after the cut) on average")
        print(f"work: 1 epoch, {args.pairs // args.batch_size} steps of {args.batch_size} pairs, max_length "
              f"{args.max_length}; sigmoid DPO beta 0.1 + 0.2 NLL(chosen); AdamW lr {args.lr} constant, {args.precision}")
        print("timed: reference pass over the epoch's pairs + training loop, on both sides")
        results = {side: run_side(__file__, child_argv(args, work), side, echo=args.verbose)
                   for side in ("ours", "peer")}
    ours, peer = results["ours"], results["peer"]
    for name, r in (("ours (align DPO stage)", ours), ("peer (trl.DPOTrainer)", peer)):
        print(f"{name}: {r['pairs']} pairs, reference {r['ref_seconds']:.2f} s + training {r['train_seconds']:.2f} s "
              f"-> {r['pairs_per_s']:.2f} pairs/s; loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}; "
              f"peak {r['peak_mb']:.0f} MB ({r['memory']}), +{r['delta_mb']:.0f} MB while timed")
    emit_json({
        "bench": "dpo",
        "ours": rounded(ours["pairs_per_s"]),
        "peer": rounded(peer["pairs_per_s"]),
        "unit": "records/s",
        "ratio": rounded(ratio(ours["pairs_per_s"], peer["pairs_per_s"])),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "peer_peak_mb": round(peer["peak_mb"], 1),
        "ours_timed_delta_mb": round(ours["delta_mb"], 1),
        "peer_timed_delta_mb": round(peer["delta_mb"], 1),
        "ours_ref_s": rounded(ours["ref_seconds"]),
        "peer_ref_s": rounded(peer["ref_seconds"]),
        "ours_final_loss": rounded(ours["final_loss"]),
        "peer_final_loss": rounded(peer["final_loss"]),
        "model": model_desc,
        "config": f"{args.data} data, {args.pairs} pairs (1 epoch), batch {args.batch_size}, "
                  f"max_length {args.max_length}, {args.precision}, device {ours['device']}",
    })
    return 0


# ---------------------------------------------------------------- side: ours


def ours_recipe(args, work: Path) -> dict:
    init = str(work / "init")
    return {
        "name": "bench_dpo", "seed": args.seed, "output_dir": str(work / "runs"),
        "stages": [{
            "name": "dpo", "kind": "dpo", "beta": 0.1, "nll_weight": 0.2, "formatting_tokens": "off",
            "metrics_records": 0,
            "model": {"path": init, "tokenizer": init},
            "data": {"paths": [str(work / "pairs.jsonl")]},
            "train": {
                "epochs": 1, "batch_size": args.batch_size, "max_length": args.max_length,
                "save_every": 0, "log_every": 1, "report_to": [],
                "mixed_precision": "bf16" if args.precision == "bf16" else "no",
                "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
                          "betas": [0.9, 0.95], "max_grad_norm": 1.0},
            },
        }],
    }


def run_ours(args, work: Path) -> dict:
    """The DPO stage through ``run_stage`` (in this process); its reference pass and training loop are wrapped
    (observed, not changed) to time them."""
    import align.train.dpo as dpo_stage
    import align.train.fit as fit
    from align.config.recipe import recipe_from_dict
    from align.runner import run_stage
    from align.train.metrics import read_metrics

    recipe = recipe_from_dict(ours_recipe(args, work))
    device = pick_device()
    owner = {"reference_logps": dpo_stage, "train": fit}  # the DPO task's reference pass; fit's call of the loop
    real = {name: getattr(module, name) for name, module in owner.items()}
    probe = {"pairs": 0}

    def timed(name):
        def wrapper(*a, **kw):
            if name == "train":
                source = kw["source"]
                make_batch = source.make_batch

                def counting(group):
                    batch = make_batch(group)
                    probe["pairs"] += batch.num_pairs
                    return batch

                source.make_batch = counting
            with measure(device) as m:
                out = real[name](*a, **kw)
            probe[name] = m
            return out
        return wrapper

    for name in real:
        setattr(owner[name], name, timed(name))
    try:
        result = run_stage(recipe, recipe.stages[0].name, 1, "bench")
    finally:
        for name, fn in real.items():
            setattr(owner[name], name, fn)
    assert result.metrics["ref_cache_hit"] == 0.0
    ref_m, train_m = probe["reference_logps"], probe["train"]
    losses = [r["train/loss"] for r in read_metrics(Path(recipe.run_dir) / "round_1" / "dpo") if "train/loss" in r]
    seconds = ref_m.seconds + train_m.seconds
    return {
        "side": "ours", "device": device, "pairs": probe["pairs"], "pairs_per_s": probe["pairs"] / seconds,
        "ref_seconds": ref_m.seconds, "train_seconds": train_m.seconds,
        "first_loss": losses[0], "final_loss": losses[-1], "peak_mb": max(ref_m.peak_mb, train_m.peak_mb),
        "delta_mb": max(ref_m.delta_mb, train_m.delta_mb), "memory": train_m.kind,
    }


# ---------------------------------------------------------------- side: peer (TRL)


def run_peer(args, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    device = pick_device()
    init = str(work / "init")
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train",
                           cache_dir=str(work / "hf_cache"))
    config = DPOConfig(
        output_dir=str(work / "trl_out"), seed=args.seed, num_train_epochs=1,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], max_length=args.max_length,
        truncation_mode="keep_start", precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
        gradient_checkpointing=False, bf16=args.precision == "bf16", fp16=False, use_cpu=device == "cpu",
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", logging_steps=1, report_to="none",
    )
    probe = {}
    trainer_cls = _timed_trainer_class(device, probe)
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    with measure(device) as m:
        trainer.train()
    ref_m = probe["ref"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = ref_m.seconds + m.seconds
    return {
        "side": "peer", "device": device, "pairs": trainer.bench_pairs, "pairs_per_s": trainer.bench_pairs / seconds,
        "ref_seconds": ref_m.seconds, "train_seconds": m.seconds,
        "first_loss": losses[0], "final_loss": losses[-1], "peak_mb": max(ref_m.peak_mb, m.peak_mb),
        "delta_mb": max(ref_m.delta_mb, m.delta_mb), "memory": m.kind,
    }


def _timed_trainer_class(device, probe):
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer that times its reference pre-computation and counts the training pairs it sees."""

        bench_pairs = 0

        def _precompute_ref_logps(self, *args, **kwargs):
            with measure(device) as m:
                out = super()._precompute_ref_logps(*args, **kwargs)
            probe["ref"] = m
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.bench_pairs += int(inputs["input_ids"].shape[0]) // 2  # rows: chosen then rejected
            return super().compute_loss(model, inputs, *args, **kwargs)

    return TimedDPOTrainer


if __name__ == "__main__":
    sys.exit(main())
