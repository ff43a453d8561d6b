"""SFT speed and memory: align's SFT stage vs TRL's ``SFTTrainer``, on identical work.

Both sides start from the same saved weights (a tiny Llama written to a temp folder), read the same chats
(a JSONL file in TRL's ``messages`` format), train with loss on assistant tokens (content + <|eot_id|>)
only, the same batch size, max length, packing choice, number of optimizer steps, and AdamW
(constant lr, betas 0.9/0.95, no weight decay, grad-norm clip 1.0), in fp32. Each side runs in a fresh
child process; the timed section is the training loop only (ours: ``align.train.loop.train`` inside the
stage; TRL: ``trainer.train()``); model loading and tokenisation are done before it on both sides.

    python bench/sft.py                  # defaults: ~1-2 minutes on 2 CPU cores
    python bench/sft.py --no-packing --vocab 128256

The last line printed is the JSON result; ``ratio`` = ours / peer examples per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    StepClock,
    emit_json,
    measure,
    messages_row,
    pick_device,
    ratio,
    rounded,
    run_side,
    save_tiny_llama,
    write_jsonl,
)

SHARED_SFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft.train.jsonl"

# align's Llama 3 template with {% generation %} markers around what align scores (content + <|eot_id|>),
# so TRL's assistant_only_loss masks exactly the same tokens. Renders the same text as LLAMA3_CHAT_TEMPLATE.
MARKED_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps on each side (the first is warm-up); 0: one epoch over the chats, so "
                   "both sides train on the same examples (with packing each side draws its own rows, and which "
                   "rows a short run draws moves examples per step by +-6%%)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples per step without packing; with packing, packed rows of max-length per step")
    p.add_argument("--max-length", type=int, default=256, help="truncate / pack to this many tokens")
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 64, MLP ~8/3 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000,
                   help="model vocabulary (embedding + LM head rows); the byte tokenizer uses 262 of them, "
                   "the rest stand for the unused tail of a real 32k-128k vocabulary")
    p.add_argument("--data", choices=["builtin", "shared"], default="builtin",
                   help="builtin: align.data.builtin.chat_records (1-2 turn chats); shared: " + str(SHARED_SFT))
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack examples into rows of max-length on both sides (TRL: packing=True, bfd, padding-free)")
    p.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (no warmup) on both sides")
    p.add_argument("--examples", type=int, default=0,
                   help="chats to use (builtin: to generate; 0: enough for --steps; shared: 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per side (1: stable timings on a shared machine; 0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side this many times, interleaved, and report each side's best run "
                   "(use 2-3 on a machine shared with other work)")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- parent: data, model, both sides


def prepare_data(args, path: Path) -> dict:
    """Write the chats both sides train on; keep only those with an assistant token within max_length
    (align drops the others; TRL's packing would keep them as loss-free rows)."""
    from align.data.builtin import chat_records
    from align.data.chat import build_byte_tokenizer, tokenize_chat
    from align.data.collate import epoch_order
    from data_schemas import read_jsonl

    per_step = args.batch_size * (max(1, args.max_length // 40) if args.packing else 1)
    n = args.examples or max(256, 2 * (args.steps or 24) * per_step)
    if args.data == "shared":
        records = list(read_jsonl(SHARED_SFT, "sft"))[: args.examples or None]
    else:
        records = chat_records(n, args.seed)
    tok = build_byte_tokenizer()
    rows, lengths, scored, turns = [], [], 0, 0
    for r in records:
        ex = tokenize_chat(tok, r.conversation(), args.max_length)
        if not any(ex.loss_mask[1:]):
            continue
        rows.append(messages_row(r))
        lengths.append(len(ex))
        scored += sum(ex.loss_mask[1:])
        turns += sum(m.role == "assistant" for m in r.messages)
    write_jsonl(path, rows)
    # TRL reads the chats in the order align's stage visits them (align.data.collate.epoch_order of the
    # stage seed), so without packing both sides train on the same batches in the same order.
    write_jsonl(path.with_name("data_peer.jsonl"), [rows[i] for i in epoch_order(len(rows), args.seed, 0)])
    return {"records": len(rows), "dropped": len(records) - len(rows),
            "mean_tokens": sum(lengths) / len(lengths), "scored_fraction": scored / sum(lengths),
            "assistant_turns_per_record": turns / len(rows)}


def child_argv(args, work: Path, run: int) -> list[str]:
    argv = ["--steps", args.steps, "--batch-size", args.batch_size, "--max-length", args.max_length,
            "--lr", args.lr, "--seed", args.seed, "--work", work, "--run", run,
            "--packing" if args.packing else "--no-packing"]
    return [str(a) for a in argv]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:  # a child: one side, one JSON line
        emit_json((run_ours if args.side == "ours" else run_peer)(args, Path(args.work)))
        return 0
    if args.data == "shared" and not SHARED_SFT.is_file():
        print(f"skipped: {SHARED_SFT} not found (use --data builtin)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        work = Path(tmp)
        stats = prepare_data(args, work / "data.jsonl")
        _, model_desc = save_tiny_llama(work / "init", args.hidden, args.layers, args.vocab, args.seed,
                                        max_positions=max(1024, args.max_length))
        describe(args, stats, model_desc)
        runs = {"ours": [], "peer": []}
        for r in range(args.repeats):  # interleaved, so load from elsewhere hits both sides alike
            for side in ("ours", "peer"):
                runs[side].append(run_side(__file__, child_argv(args, work, r), side, threads=args.threads,
                                            echo=args.verbose))
    best = {side: max(rs, key=lambda x: x["examples_per_s"]) for side, rs in runs.items()}
    summarize(args, runs, best["ours"], best["peer"])
    emit_json(result_line(args, best["ours"], best["peer"], model_desc))
    return 0


def describe(args, stats: dict, model_desc: str) -> None:
    layout = ("packed (ours: the epoch packed best-fit into rows of max_length, batch rows per step; "
              "TRL: bfd packing into rows of max_length, batch rows per step flattened into one padding-free "
              "row)" if args.packing else "padded (batch examples per step, right-padded, same batches)")
    threads = args.threads if args.threads > 0 else "torch default"
    print(f"model: {model_desc}; device: {pick_device()} (threads per side: {threads}; the sides run one "
          f"after the other, each in a fresh process)")
    print(f"data: {args.data}, {stats['records']} chats ({stats['dropped']} dropped: no assistant token "
          f"within max_length), {stats['mean_tokens']:.0f} tokens on average, "
          f"{100 * stats['scored_fraction']:.0f}% of them scored (assistant), "
          f"{stats['assistant_turns_per_record']:.2f} assistant turns per chat")
    print(f"work: {args.steps or 'one epoch of'} steps, batch {args.batch_size}, max_length {args.max_length}, {layout}; "
          f"AdamW lr {args.lr} constant, fp32, loss on assistant tokens only")
    print("timed: the training loop from the end of step 1 to the end of the last step (step 1 is warm-up); "
          "ours: align.train.loop.train with its collation; TRL: trainer.train() with its dataloader; "
          "loading and tokenisation are excluded on both sides")


def summarize(args, runs: dict, ours: dict, peer: dict) -> None:
    for name, r in (("ours (align SFT stage)", ours), ("peer (trl.SFTTrainer)", peer)):
        print(f"{name}: {r['examples_steady']} examples in steps 2-{r['steps']}, {r['seconds']:.2f} s -> "
              f"{r['examples_per_s']:.2f} examples/s, {r['tokens_per_s']:.0f} tokens/s "
              f"(all {r['steps']} steps: {r['examples']} examples, {r['seconds_all']:.2f} s, "
              f"{r['examples_per_s_all']:.2f} examples/s); {r['scored_tokens']} scored tokens; "
              f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}; peak {r['peak_mb']:.0f} MB "
              f"({r['memory']}), +{r['delta_mb']:.0f} MB in training; {r['note']}")
    if args.repeats > 1:
        for side, rs in runs.items():
            print(f"{side} examples/s over {args.repeats} runs: "
                  + ", ".join(f"{x['examples_per_s']:.2f}" for x in rs) + " (the best is reported)")
    print(f"ratio over all steps, step 1 included: "
          f"{ratio(ours['examples_per_s_all'], peer['examples_per_s_all']):.2f}")
    if args.packing:
        print("packing: each side forms its own packed rows from the same chats, so the batches differ a "
              "little (see examples and scored tokens above)")
    else:
        same = ours["examples"] == peer["examples"] and ours["scored_tokens"] == peer["scored_tokens"]
        print(f"same batches on both sides: {'yes' if same else 'NO'} ({ours['examples']} vs "
              f"{peer['examples']} examples, {ours['scored_tokens']} vs {peer['scored_tokens']} scored tokens)")


def result_line(args, ours: dict, peer: dict, model_desc: str) -> dict:
    return {
        "bench": "sft",
        "ours": rounded(ours["examples_per_s"]),
        "peer": rounded(peer["examples_per_s"]),
        "unit": "examples/s",
        "ratio": rounded(ratio(ours["examples_per_s"], peer["examples_per_s"])),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "peer_peak_mb": round(peer["peak_mb"], 1),
        "ours_train_delta_mb": round(ours["delta_mb"], 1),
        "peer_train_delta_mb": round(peer["delta_mb"], 1),
        "ours_final_loss": rounded(ours["final_loss"]),
        "peer_final_loss": rounded(peer["final_loss"]),
        "steps": args.steps or "one epoch",
        "timed_steps": ours["steps"] - 1,
        "peer_timed_steps": peer["steps"] - 1,
        "ours_tokens_per_s": rounded(ours["tokens_per_s"]),
        "peer_tokens_per_s": rounded(peer["tokens_per_s"]),
        "ours_examples_per_step": rounded(ours["examples"] / ours["steps"]),
        "peer_examples_per_step": rounded(peer["examples"] / peer["steps"]),
        "model": model_desc,
        "config": f"{args.data} data, batch {args.batch_size}, max_length {args.max_length}, "
                  f"{'packing' if args.packing else 'no packing'}, {ours['device']}, "
                  f"threads {args.threads or 'default'}, best of {args.repeats}",
    }


# ---------------------------------------------------------------- side: ours


def ours_recipe(args, work: Path) -> dict:
    init = str(work / "init")
    return {
        "name": "bench_sft", "seed": args.seed, "output_dir": str(work / f"runs_{args.run}"),
        "stages": [{
            "name": "sft", "kind": "sft", "packing": args.packing,
            "model": {"path": init, "tokenizer": init},
            "data": {"paths": [str(work / "data.jsonl")]},
            "train": {
                "max_steps": args.steps or None, "epochs": 1, "batch_size": args.batch_size,
                "max_length": args.max_length,
                "save_every": 0, "log_every": 1, "report_to": [],
                "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
                          "betas": [0.9, 0.95], "max_grad_norm": 1.0},
            },
        }],
    }


def run_ours(args, work: Path) -> dict:
    """The SFT stage through ``run_stage`` (in this process). Its training loop (``align.train.loop.train``, imported
    by the stage module) is wrapped to observe it: a clock around it and at every step (``on_step``), and
    a count of the examples its batches hold. Nothing it computes is changed."""
    import time

    import align.train.fit as fit
    from align.config.recipe import recipe_from_dict
    from align.runner import run_stage
    from align.train.metrics import read_metrics

    recipe = recipe_from_dict(ours_recipe(args, work))
    stage = recipe.stages[0]
    device = pick_device()
    clock = StepClock(device)
    counts = {"examples": 0, "tokens": 0, "scored": 0}
    real_train = fit.train
    out = {}

    def observed_train(**kwargs):
        source, inner_on_step = kwargs["source"], kwargs.get("on_step")
        make_batch = source.make_batch

        def counting_make_batch(group):
            batch = make_batch(group)
            counts["examples"] += batch.num_examples
            counts["tokens"] += batch.num_tokens
            counts["scored"] += batch.num_scored
            return batch

        def on_step(done):
            if inner_on_step is not None:
                inner_on_step(done)
            clock.mark(**counts)

        source.make_batch = counting_make_batch
        kwargs.update(on_step=on_step)
        with measure(device) as out["memory"]:
            clock.start(**counts)
            out["summary"] = real_train(**kwargs)
        return out["summary"]

    fit.train = observed_train  # fit's call of the loop
    try:
        t0 = time.perf_counter()
        run_stage(recipe, stage.name, 1, "bench")
        stage_s = time.perf_counter() - t0
    finally:
        fit.train = real_train
    losses = [r["train/loss"] for r in read_metrics(recipe.run_dir / "round_1" / "sft") if "train/loss" in r]
    note = f"whole stage incl. loading, tokenisation and saving the model: {stage_s:.1f} s"
    return side_result("ours", clock, out["memory"], losses, note)


def side_result(side: str, clock: StepClock, memory, losses: list[float], note: str) -> dict:
    return {
        "side": side, "device": clock.device, "steps": clock.steps,
        "examples": clock.count("examples"), "seconds_all": clock.seconds(),
        "examples_per_s_all": clock.rate("examples"),
        "examples_steady": clock.count("examples", skip=1), "seconds": clock.seconds(skip=1),
        "examples_per_s": clock.rate("examples", skip=1), "tokens_per_s": clock.rate("tokens", skip=1),
        "scored_per_s": clock.rate("scored", skip=1), "scored_tokens": clock.count("scored"),
        "first_loss": losses[0], "final_loss": losses[-1], **memory.as_dict(), "note": note,
    }


# ---------------------------------------------------------------- side: peer (TRL)


def run_peer(args, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device = pick_device()
    clock = StepClock(device)
    counts = {"examples": 0, "tokens": 0, "scored": 0}

    class CountingSFTTrainer(SFTTrainer):
        """Counts the examples and tokens of the training batches (read only)."""

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                if "attention_mask" in inputs:  # padded: one example per row
                    counts["examples"] += int(inputs["input_ids"].shape[0])
                    counts["tokens"] += int(inputs["attention_mask"].sum())
                else:  # padding-free: every example starts at position 0
                    counts["examples"] += int((inputs["position_ids"] == 0).sum())
                    counts["tokens"] += int(inputs["input_ids"].numel())
                counts["scored"] += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.mark(**counts)

    init = str(work / "init")
    tokenizer = AutoTokenizer.from_pretrained(init)
    tokenizer.chat_template = MARKED_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(work / "data_peer.jsonl"), split="train",
                           cache_dir=str(work / "hf_cache"))
    config = SFTConfig(
        output_dir=str(work / f"trl_out_{args.run}"), seed=args.seed, max_steps=args.steps or -1, num_train_epochs=1,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        max_length=args.max_length, packing=args.packing, packing_strategy="bfd", padding_free=args.packing,
        assistant_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=device == "cpu", dataloader_num_workers=0, save_strategy="no", eval_strategy="no",
        logging_steps=1, report_to="none",
        # no packing: read in align's order (data_peer.jsonl), so the batches are the same; packing: TRL's
        # default random order over its packed rows (its rows differ from align's anyway)
        train_sampling_strategy="random" if args.packing else "sequential",
    )
    same = _same_masks_as_align(tokenizer, dataset, limit=200)
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[Clock()])
    with measure(device) as memory:
        clock.start(**counts)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    note = (f"SFTTrainer(packing={args.packing}, padding_free={args.packing}, assistant_only_loss=True); "
            f"token ids and loss masks identical to align's on {same}")
    return side_result("peer", clock, memory, losses, note)


def _same_masks_as_align(tokenizer, dataset, limit: int) -> str:
    """Check that TRL's assistant mask (the marked template) equals align's loss mask, chat by chat."""
    from align.data.chat import tokenize_chat

    n = min(limit, len(dataset))
    same = 0
    for row in dataset.select(range(n)):
        ours = tokenize_chat(tokenizer, row["messages"])
        trl = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        same += trl["input_ids"] == ours.input_ids and [bool(x) for x in trl["assistant_masks"]] == ours.loss_mask
    return f"{same}/{n} chats"


if __name__ == "__main__":
    sys.exit(main())
