"""How close each stage comes to what this machine can do: achieved model FLOP/s as a fraction of the
measured dense matmul peak.

1. ``peak``: the best of a few square matmuls (fp32 on a CPU with the threads the process has, bf16 on a
   GPU), in GFLOP/s: the reference point, measured, not taken from a datasheet.
2. Each stage, run through align (``run_stage`` on the built-in data, a short run), at two sizes: the
   benches' model (h256, 4 layers, 32k vocabulary) and the default round's (h128, 4 layers, its 512-id
   ``builtin:world`` tokenizer):
   - SFT, reward model, DPO: the median training tokens/s of the steps after the first two, times
     ``6 N`` (forward + backward);
   - rejection sampling: generated tokens/s (prefill not counted), times ``2 N``;
   - PPO (the gold judge as its reward, value model of the policy's size): per iteration, ``2 N`` per
     generated token + ``3 x 2 N`` per rollout token (policy, value and reference passes without gradients)
     + ``2 x 6 N`` per rollout token and PPO epoch (policy and value trained), over the iteration's wall
     time (median of the iterations after the first two); prompt prefill not counted;
   where ``N`` is the decoder layers' parameter count: the input embedding is a lookup, and the LM head runs
   only on the positions a stage scores (none in the reward model), a share not counted, so the model
   FLOPs and the fraction are lower bounds. DPO's reference pass (``2 N`` per token) is outside the timed
   steps.

The fraction is what a stage achieves of the peak; at these sizes on a CPU it is small by nature (Python,
kernel launches and the optimizer cost about as much as the arithmetic of a 1M-parameter model), which is
the point: it says where the time goes, and how much faster the same work could be.

    python bench/roofline.py                 # ~5 minutes on 2 CPU cores
    python bench/roofline.py --sizes round   # the default round's size only

The last line printed is one JSON object (``{"bench": "roofline", "peak_gflops": ..., "stages": [...]}``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit_json, pick_device, save_tiny_llama  # noqa: E402

SIZES = {"bench": {"hidden": 256, "layers": 4, "vocab": 32000},
         "round": {"hidden": 128, "layers": 4, "vocab": 0, "tokenizer": "builtin:world"}}


def peak_gflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` square matmul rate (fp32 on CPU, bf16 on GPU), GFLOP/s."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def flop_parameters(folder: Path) -> int:
    """Parameters of the decoder layers (and final norm): no input embedding (a lookup) and no LM head (the
    stages run it only on the positions they score, a share not counted here), so the model FLOPs, and the
    fraction of peak, are lower bounds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in model.get_decoder().parameters()) - model.get_input_embeddings().weight.numel()


def stages(init: str, steps: int) -> list[dict]:
    model = {"path": init}
    train = {"max_steps": steps, "batch_size": 8, "max_length": 256, "report_to": [], "save_every": 0,
             "optim": {"lr": 1e-4, "warmup_ratio": 0.0}}
    return [
        {"name": "sft", "kind": "sft", "model": model, "data": {"builtin": "world", "builtin_size": 2000},
         "train": {**train, "batch_size": 4}},
        {"name": "reward_model", "kind": "reward_model", "model": model, "stats_records": 0,
         "data": {"builtin": "world_helpful", "builtin_size": 400}, "train": train},
        {"name": "dpo", "kind": "dpo", "model": model, "metrics_records": 0,
         "data": {"builtin": "chat", "builtin_size": 400}, "train": train},
        {"name": "ppo", "kind": "ppo", "model": model, "reward": {"function": "gold"}, "evaluators": [],
         "prompts": {"builtin": "world", "builtin_size": 32 * (steps + 1)}, "iterations": steps,
         "rollout_batch_size": 32, "ppo_epochs": 2,
         "sampling": {"temperature": 1.0, "max_new_tokens": 48, "batch_size": 32},
         "train": {**train, "batch_size": 16, "max_length": 512}},
        {"name": "rejection_sampling", "kind": "rejection_sampling", "model": model, "k": 8,
         "prompts": {"builtin": "world", "builtin_size": 32}, "reward": {"function": "gold"}, "write_pairs": False,
         "sampling": {"temperature": 1.0, "max_new_tokens": 48, "batch_size": 16}},
    ]


def generation_rate(stage: dict) -> float:
    """Generated tokens/s of the rejection-sampling stage's generation (K samples per prompt through its
    generator, one shared prefill per prompt), counted from the samples' token ids; after a warm-up call."""
    from align.config.sampling import SamplingParams
    from align.config.specs import DataSpec, ModelSpec
    from align.data.sources import load_prompts
    from align.generation import policy_generator

    path = stage["model"]["path"]
    generator = policy_generator(ModelSpec(path=path), path, "hf", 0, pick_device())
    prompts = [p.prompt for p in load_prompts(DataSpec(**stage["prompts"]), [], 0)]
    params = SamplingParams(**stage["sampling"])
    generator.sample(prompts[: params.batch_size], 2, params)
    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), params.batch_size):
        tokens += sum(len(s.token_ids) for ss in generator.sample(prompts[i : i + params.batch_size], stage["k"], params)
                      for s in ss)
    return tokens / (time.perf_counter() - t)


def measure_stage(stage: dict, work: Path, n: int, peak: float) -> dict:
    if stage["kind"] == "rejection_sampling":
        rate, factor = generation_rate(stage), 2
    else:
        from align.config.recipe import recipe_from_dict
        from align.runner import run_stage

        recipe = recipe_from_dict({"name": stage["name"], "seed": 0, "output_dir": str(work), "stages": [stage]})
        run_stage(recipe, stage["name"], 1, "roofline")
        out_dir = work / stage["name"] / "round_1" / stage["name"]
        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        if stage["kind"] == "ppo":
            return ppo_row(stage, rows, n, peak)
        rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][2:]
        rate, factor = statistics.median(rates), 6
    gflops = factor * n * rate / 1e9
    return {"stage": stage["kind"], "tokens_per_s": round(rate, 1), "model_gflops": round(gflops, 3),
            "fraction_of_peak": round(gflops / peak, 4)}


def ppo_row(stage: dict, rows: list[dict], n: int, peak: float) -> dict:
    """PPO's model FLOP/s per iteration (module docstring) from its metrics: the optimizer steps' mean
    real tokens x steps / epochs = the rollout's tokens; response length x rollout batch = generated ones."""
    epochs, batch = stage["ppo_epochs"], stage["rollout_batch_size"]
    rates, tokens = [], []
    for r in rows:
        if "train/seconds" not in r:
            continue
        rollout_tokens = r["train/tokens"] * r["train/optimizer_steps"] / epochs
        generated = r["train/response_length"] * batch
        flops = 2 * n * generated + 6 * n * rollout_tokens + 12 * n * rollout_tokens * epochs
        rates.append(flops / r["train/seconds"])
        tokens.append(rollout_tokens / r["train/seconds"])
    gflops = statistics.median(rates[2:]) / 1e9
    return {"stage": "ppo", "tokens_per_s": round(statistics.median(tokens[2:]), 1),
            "model_gflops": round(gflops, 3), "fraction_of_peak": round(gflops / peak, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["bench", "round"])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per training stage")
    args = p.parse_args(argv)
    import torch

    device = pick_device()
    peak = peak_gflops(device)
    print(f"device {device}, {torch.get_num_threads()} threads: dense matmul peak {peak:.1f} GFLOP/s "
          f"({'bf16' if device == 'cuda' else 'fp32'})")
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="roofline_") as tmp:
            work = Path(tmp)
            init, desc = save_tiny_llama(work / "init", **SIZES[size])
            n = flop_parameters(init)
            print(f"size {size}: {desc}; N = {n / 1e6:.2f}M (decoder layers)")
            for stage in stages(str(init), args.steps):
                row = {"size": size, **measure_stage(stage, work / "runs", n, peak)}
                rows.append(row)
                print(f"  {row['stage']:<20} {row['tokens_per_s']:>9.0f} tokens/s  {row['model_gflops']:7.2f} "
                      f"GFLOP/s  {100 * row['fraction_of_peak']:5.1f}% of peak")
    emit_json({"bench": "roofline", "device": device, "threads": torch.get_num_threads(),
               "peak_gflops": round(peak, 1), "stages": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
