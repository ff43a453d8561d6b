"""PPO speed and memory: align's ppo stage vs TRL 1.12's ``PPOTrainer``, on the same work.

TRL dropped PPO after 1.12 (``trl.experimental.ppo``), so the peer is trl==1.12.0 installed with
``pip install --no-deps --target`` into the test cache (``bench.common.pip_target``, as
``tests/invariants/test_ppo_trl_parity.py`` does) and imported, in its own child process, with that folder
first on ``sys.path``; the project's own (newer) trl is never imported there. Everything else (torch,
transformers, accelerate, datasets) is the project's environment.

Both sides start from the same saved checkpoints: the policy (a tiny Llama with align's 262-id byte
tokenizer; also the KL reference, loaded separately), and one reward model (a
``LlamaForSequenceClassification``, num_labels 1, built from the policy's weights with a seeded head) that
both scores the responses (not whitened) and is where the value model starts. Same prompts (align's
built-in world prompts, rendered with the chat template; TRL gets their token ids), one response each per
iteration, sampled at the same temperature (no top-k / top-p), up to ``--max-new-tokens`` tokens, stopped
at the same token (``<|eot_id|>``, the tokenizer's eos) on both sides; same rollout batch, PPO epochs,
minibatch (one optimizer step per minibatch, no accumulation), KL coefficient (k1 estimator), clip ranges,
vf_coef, GAE gamma/lambda, whitened advantages and no reward whitening, no missing-EOS penalty; AdamW
(constant lr, betas 0.9/0.95, no weight decay, no gradient clipping: TRL's PPO loop clips nothing), fp32,
no activation checkpointing. Generation runs in batches of ``--gen-batch`` prompts on both sides (TRL's
``local_rollout_forward_batch_size``, which also sizes its no-grad reference/value/reward passes).

What still differs, each library's own way of doing the same iteration: (1) the rollout's policy log-probs:
ours recomputes them with a no-grad policy pass (so the sampler's numerics never enter the ratio), TRL
keeps the logits ``generate`` returned (B x T x V) and reads them from there: ours runs one more policy
forward per iteration; (2) the sampler: ours is align's decoding loop (static KV cache, rows dropped once a
quarter of the batch has stopped), TRL's is ``model.generate`` (dynamic cache): different random draws, so
response lengths differ a little (reported; every batch is padded to its longest response on both sides,
so the compute hardly depends on them); (3) ours runs its no-grad policy/value/reference passes in
minibatch-sized groups (the reward in ``--gen-batch`` groups), TRL all of them in ``--gen-batch`` groups;
(4) ours scores decoded text re-tokenised by the reward model's tokenizer, TRL scores the token ids;
(5) both see every prompt of the pool (rollout batch x iterations) once, in different shuffles.

An episode is one prompt's trip through an iteration: generation, reward, reference and value passes,
advantages, and its share of the PPO epochs. Timed on both sides: the iteration loop, from just before the
first iteration to the end of the last (ours: ``align.train.ppo.run``'s loop, observed by wrapping its
progress bar and metrics logger; TRL: ``trainer.train()``'s loop, observed by a callback's
``on_train_begin`` / ``on_step_end``). The first ``--warmup`` iterations are run but left out of the rate
(lazy initialisation, first allocations), on both sides alike. Model loading, tokenisation and the final
checkpoint save are excluded on both sides. Memory: the child's peak RSS on CPU (max allocated on CUDA)
when the last iteration ends, and its growth over the value just before the loop.

    python bench/ppo.py                      # defaults: a few minutes on 2 CPU cores
    python bench/ppo.py --iterations 2 --warmup 1 --rollout-batch 16 --minibatch 8 --max-new-tokens 8

The last line printed is the JSON result; ``ratio`` = ours / peer episodes per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    LoopClock,
    emit_json,
    pick_device,
    pip_target,
    ratio,
    rounded,
    run_side,
    save_tiny_llama,
    write_jsonl,
)
from bench.ppo_peer import TRL_MARKER, TRL_VERSION, run_peer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=6,
                   help="PPO iterations (rollout batch + PPO epochs) on each side, warm-up included")
    p.add_argument("--warmup", type=int, default=1,
                   help="leading iterations run but not timed, on both sides (lowered to iterations - 1 "
                   "when there are not enough iterations)")
    p.add_argument("--rollout-batch", type=int, default=64, help="prompts per iteration (one response each)")
    p.add_argument("--minibatch", type=int, default=16,
                   help="responses per optimizer step (a divisor of --rollout-batch)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest response (TRL: response_length)")
    p.add_argument("--gen-batch", type=int, default=0,
                   help="prompts per generation call (ours: sampling.batch_size and the reward's batch; TRL: "
                   "local_rollout_forward_batch_size); 0: the whole rollout batch")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature on both sides")
    p.add_argument("--kl-coef", type=float, default=0.05, help="beta of the per-token KL penalty (k1)")
    p.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate on both sides")
    p.add_argument("--hidden", type=int, default=64, help="model width (head_dim 64, MLP ~8/3 x hidden)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the prompts and the sampling")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of each side's process (OMP/MKL); 0: inherit the environment")
    p.add_argument("--trl-dir", default=None,
                   help=f"a folder holding trl=={TRL_VERSION} (pip --target); default: installed on first use "
                   "into $ALIGN_TEST_CACHE or ~/.cache/align-tests")
    p.add_argument("--skip-peer", action="store_true", help="run ours only (peer reported as null)")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gen_batch = args.gen_batch or args.rollout_batch
    return args


# ---------------------------------------------------------------- parent: models, prompts, both sides


def prepare(args, work: Path) -> dict:
    """Save the policy and the reward model, and write the prompts: our records and TRL's token ids."""
    from align.config.specs import ModelSpec
    from align.data.builtin import BUILTIN_PROMPTS
    from align.data.chat import build_byte_tokenizer
    from align.generation.protocol import prompt_ids
    from align.models.reward import load_reward_model, load_reward_tokenizer

    _, desc = save_tiny_llama(work / "policy", args.hidden, args.layers, 0, args.seed,
                              max_positions=max(1024, 4 * args.max_new_tokens))
    spec = ModelSpec(path=str(work / "policy"))
    rm_tok = load_reward_tokenizer(spec, spec.path)
    load_reward_model(spec, spec.path, rm_tok, seed=args.seed + 1).save_pretrained(work / "rm")
    rm_tok.save_pretrained(work / "rm")

    tok = build_byte_tokenizer()
    records = BUILTIN_PROMPTS["world"](args.rollout_batch * args.iterations, args.seed)
    ids = [prompt_ids(tok, r.prompt) for r in records]
    write_jsonl(work / "prompts.jsonl", [r.model_dump(mode="json") for r in records])
    write_jsonl(work / "prompt_ids.jsonl", [{"input_ids": x} for x in ids])
    return {"model": desc, "prompts": len(records), "prompt_tokens": sum(map(len, ids)) / len(ids),
            "eot": tok.eos_token_id, "pad": tok.pad_token_id}


def child_argv(args, work: Path) -> list[str]:
    argv = ["--iterations", args.iterations, "--warmup", args.warmup, "--rollout-batch", args.rollout_batch,
            "--minibatch", args.minibatch, "--ppo-epochs", args.ppo_epochs, "--max-new-tokens",
            args.max_new_tokens, "--gen-batch", args.gen_batch, "--temperature", args.temperature,
            "--kl-coef", args.kl_coef, "--lr", args.lr, "--seed", args.seed, "--work", work]
    if args.trl_dir:
        argv += ["--trl-dir", args.trl_dir]
    return [str(a) for a in argv]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        side = run_ours if args.side == "ours" else run_peer
        emit_json(side(args, Path(args.work)))
        return 0
    if args.rollout_batch % args.minibatch:
        raise SystemExit("--minibatch must divide --rollout-batch (whole optimizer steps on both sides)")
    if args.rollout_batch % args.gen_batch:
        raise SystemExit("--gen-batch must divide --rollout-batch (TRL needs whole forward batches)")
    args.warmup = max(0, min(args.warmup, args.iterations - 1))
    peer_error = None
    if args.skip_peer:
        peer_error = "--skip-peer"
    elif not args.trl_dir:
        try:
            args.trl_dir = str(pip_target("trl", TRL_VERSION, TRL_MARKER))
        except RuntimeError as err:
            peer_error = str(err)
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        info = prepare(args, work)
        steps = args.ppo_epochs * args.rollout_batch // args.minibatch
        print(f"model: {info['model']} (policy and reference); reward and value: the same backbone + scalar "
              f"head; device: {pick_device()}")
        print(f"prompts: {info['prompts']} built-in world prompts, {info['prompt_tokens']:.1f} tokens on average")
        print(f"work: {args.iterations} iterations ({args.warmup} warm-up, not timed) x {args.rollout_batch} "
              f"episodes: sample <= {args.max_new_tokens} tokens (temperature {args.temperature}, batches of "
              f"{args.gen_batch}), score, reference + value passes, {args.ppo_epochs} PPO epochs of "
              f"{args.rollout_batch // args.minibatch} minibatches of {args.minibatch} ({steps} AdamW steps)")
        print("timed: the iteration loop after the warm-up, on both sides; loading and saving excluded")
        threads = args.threads
        ours = run_side(__file__, child_argv(args, work), "ours", threads=threads, echo=args.verbose)
        peer = None
        if peer_error is None:
            try:
                peer = run_side(__file__, child_argv(args, work), "peer", threads=threads, echo=args.verbose)
            except RuntimeError as err:  # report it, still print ours
                peer_error = str(err).strip().splitlines()[-1][-300:]
                print(f"peer failed: {err}", file=sys.stderr)
    names = (("ours (align ppo stage)", ours), (f"peer (trl {TRL_VERSION} PPOTrainer)", peer))
    for name, r in names:
        if r is None:
            print(f"{name}: not run ({peer_error})")
            continue
        print(f"{name}: {r['episodes']} episodes in {r['seconds']:.2f} s over {r['timed_iterations']} timed "
              f"iterations -> {r['episodes_per_s']:.3f} episodes/s ({r['episodes_per_s_all']:.3f} with the "
              f"warm-up); responses {r['response_tokens']:.1f} tokens, {r['stopped']:.0%} stopped; peak "
              f"{r['peak_mb']:.0f} MB ({r['memory']}), +{r['delta_mb']:.0f} MB while timed")
    peer_rate = peer["episodes_per_s"] if peer else None
    emit_json({
        "bench": "ppo",
        "ours": rounded(ours["episodes_per_s"]),
        "peer": rounded(peer_rate),
        "unit": "episodes/s",
        "ratio": rounded(ratio(ours["episodes_per_s"], peer_rate)) if peer else None,
        "peer_error": peer_error,
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "peer_peak_mb": round(peer["peak_mb"], 1) if peer else None,
        "ours_timed_delta_mb": round(ours["delta_mb"], 1),
        "peer_timed_delta_mb": round(peer["delta_mb"], 1) if peer else None,
        "ours_loop_start_mb": round(ours["start_mb"], 1),
        "peer_loop_start_mb": round(peer["start_mb"], 1) if peer else None,
        "memory": ours["memory"],
        "ours_with_warmup": rounded(ours["episodes_per_s_all"]),
        "peer_with_warmup": rounded(peer["episodes_per_s_all"]) if peer else None,
        "ours_response_tokens": rounded(ours["response_tokens"]),
        "peer_response_tokens": rounded(peer["response_tokens"]) if peer else None,
        "ours_iteration_s": ours["iteration_seconds"],
        "peer_iteration_s": peer["iteration_seconds"] if peer else None,
        "timed": "iteration loop only (model loading, tokenisation and final save excluded on both sides); "
                 f"first {args.warmup} iteration(s) excluded",
        "model": info["model"],
        "config": {"iterations": args.iterations, "warmup": args.warmup, "rollout_batch": args.rollout_batch,
                   "minibatch": args.minibatch, "ppo_epochs": args.ppo_epochs,
                   "max_new_tokens": args.max_new_tokens, "gen_batch": args.gen_batch,
                   "temperature": args.temperature, "kl_coef": args.kl_coef, "lr": args.lr,
                   "prompt_tokens": rounded(info["prompt_tokens"]), "device": ours["device"],
                   "threads": args.threads or os.environ.get("OMP_NUM_THREADS", "default"),
                   "peer": f"trl=={TRL_VERSION} trl.experimental.ppo.PPOTrainer"},
    })
    return 0


# ---------------------------------------------------------------- side: ours


def ours_recipe(args, work: Path) -> dict:
    policy, rm = str(work / "policy"), str(work / "rm")
    return {
        "name": "bench_ppo", "seed": args.seed, "output_dir": str(work / "runs"),
        "stages": [{
            "name": "ppo", "kind": "ppo",
            "model": {"path": policy, "tokenizer": policy},
            "value_model": {"path": rm},
            "reward": {"model": {"path": rm}, "whiten": False, "batch_size": args.gen_batch},
            "prompts": {"paths": [str(work / "prompts.jsonl")]},
            "sampling": {"temperature": args.temperature, "top_p": 1.0, "max_new_tokens": args.max_new_tokens,
                         "stop_at_eot": True, "batch_size": args.gen_batch, "seed": args.seed},
            "iterations": args.iterations, "rollout_batch_size": args.rollout_batch,
            "ppo_epochs": args.ppo_epochs, "kl_coef": args.kl_coef, "kl_estimator": "k1",
            "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "cliprange": 0.2, "cliprange_value": 0.2,
            "vf_coef": 0.1, "missing_eos_penalty": None, "evaluators": [],
            "train": {
                "batch_size": args.minibatch, "grad_accum": 1, "mixed_precision": "no", "save_every": 0,
                "log_every": 1, "report_to": [],
                "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
                          "betas": [0.9, 0.95], "max_grad_norm": None},
            },
        }],
    }


def run_ours(args, work: Path) -> dict:
    """The ppo stage through ``run_stage`` in this process; its loop is observed (not changed) by wrapping
    the progress bar (made just before the first iteration) and the metrics logger (called at the end of
    every iteration)."""
    import align.train.fit as fit
    import align.train.loop as loop
    from align.config.recipe import recipe_from_dict
    from align.runner import run_stage
    from align.train.metrics import read_metrics

    recipe = recipe_from_dict(ours_recipe(args, work))
    clock = LoopClock(pick_device())
    real_bar, real_logger = loop.progress_bar, fit.MetricsLogger

    def progress_bar(*a, **kw):
        bar = real_bar(*a, **kw)
        clock.start(episodes=0)
        return bar

    class MetricsLogger(real_logger):
        def log(self, step, metrics, *a, **kw):
            clock.mark(episodes=step * args.rollout_batch)
            return super().log(step, metrics, *a, **kw)

    loop.progress_bar, fit.MetricsLogger = progress_bar, MetricsLogger
    try:
        run_stage(recipe, "ppo", 1, "bench")
    finally:
        loop.progress_bar, fit.MetricsLogger = real_bar, real_logger
    rows = [r for r in read_metrics(Path(recipe.run_dir) / "round_1" / "ppo") if "train/score" in r]
    return clock.result(
        "ours", args.warmup,
        response_tokens=sum(r["train/response_length"] for r in rows) / len(rows),
        stopped=1 - sum(r["train/no_eos_rate"] for r in rows) / len(rows),
        final_score=rows[-1]["train/score"],
    )


if __name__ == "__main__":
    sys.exit(main())
