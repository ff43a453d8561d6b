"""Rejection-sampling generation speed: K samples per prompt, align's HF backend vs plain ``generate``.

Same model, prompts and sampling settings on both sides, in one process (timings interleaved, best of
``--repeats``, so the load of a shared machine hits both sides alike):

- ours: ``align.generation.make_generator("hf")`` -- each batch of prompts is prefilled ONCE, the KV cache
  repeated K times, then K x batch sequences are decoded (stopped ones dropped as they pile up);
- peer: ``model.generate(do_sample=True, num_return_sequences=K)`` on the same left-padded batches --
  every prompt is copied K times before the prefill.

Prompts are long next to answers (chat prompts of 200-400 tokens, answers up to 64), as in rejection
sampling, where the prompt is shared by K samples. The model is a randomly initialised Llama with a
32k vocabulary (it rarely emits <|eot_id|>, so both sides decode the full length).

    python bench/rejection_sampling.py                 # ~5 minutes on 2 busy CPU cores
    python bench/rejection_sampling.py --k 16 --hidden 512 --layers 6

The last line printed is the JSON result; ``ratio`` = ours / peer samples per second.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit_json, pick_device, ratio, rounded, sync, tiny_llama  # noqa: E402

WORDS = ("the model answers questions about numbers words and lists while the user asks for short clear "
         "replies with examples reasons and a final answer at the end of each turn").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="prompts on each side")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generation call")
    p.add_argument("--min-prompt-tokens", type=int, default=200)
    p.add_argument("--max-prompt-tokens", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (best one counts)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_prompts(tokenizer, n: int, low: int, high: int, seed: int) -> list[list[int]]:
    """``n`` chat prompts (user turn of random words, rendered up to the assistant header) of
    ``low``-``high`` tokens, sorted by length (both sides then batch prompts of similar length)."""
    from align.data.chat import tokenize_prompt

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(low, high)
        words, ids = [], []
        while len(ids) < target:
            words.append(rng.choice(WORDS))
            ids = tokenize_prompt(tokenizer, [{"role": "user", "content": " ".join(words)}])
        prompts.append(ids)
    return sorted(prompts, key=len)


def run_ours(model, tokenizer, prompts, args) -> tuple[int, int]:
    from align.config.sampling import SamplingParams
    from align.generation import make_generator

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, batch_size=args.batch_size)
    samples = make_generator("hf", model=model, tokenizer=tokenizer).sample(prompts, args.k, params)
    return sum(len(s) for s in samples), sum(len(x.token_ids) for s in samples for x in s)


def run_peer(model, tokenizer, prompts, args) -> tuple[int, int]:
    import torch

    from align.data.chat import termination_token_id
    from align.generation.hf_backend import left_pad

    eot, pad = termination_token_id(tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device
    n_samples = n_tokens = 0
    torch.manual_seed(args.seed)
    for start in range(0, len(prompts), args.batch_size):
        input_ids, mask = left_pad(prompts[start:start + args.batch_size], pad, device)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask.long(), do_sample=True,
                                 num_return_sequences=args.k, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=0,
                                 eos_token_id=eot, pad_token_id=pad)
        new = out[:, input_ids.shape[1]:]
        ended = (new == eot).long().cumsum(-1)  # tokens up to and including the first eot count
        n_tokens += int(((ended == 0) | ((ended == 1) & (new == eot))).sum())
        n_samples += new.shape[0]
    return n_samples, n_tokens


def timed(fn, device, *args) -> tuple[float, int, int]:
    sync(device)
    t0 = time.perf_counter()
    n_samples, n_tokens = fn(*args)
    sync(device)
    return time.perf_counter() - t0, n_samples, n_tokens


def main(argv=None) -> int:
    import torch

    from align.data.chat import build_byte_tokenizer, termination_token_id

    args = parse_args(argv)
    device = pick_device()
    tokenizer = build_byte_tokenizer()
    model = tiny_llama(args.hidden, args.layers, max(args.vocab, len(tokenizer)), tie=False,
                       seed=args.seed).to(device).eval()
    model.generation_config.eos_token_id = termination_token_id(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = make_prompts(tokenizer, args.prompts, args.min_prompt_tokens, args.max_prompt_tokens, args.seed)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    desc = (f"llama h{c.hidden_size} L{c.num_hidden_layers} mlp{c.intermediate_size} heads"
            f"{c.num_attention_heads}/{c.num_key_value_heads} vocab{c.vocab_size} {n_params / 1e6:.1f}M fp32")
    print(f"model: {desc}; device: {device}; torch threads: {torch.get_num_threads()}")
    print(f"work: {len(prompts)} prompts of {len(prompts[0])}-{len(prompts[-1])} tokens "
          f"(mean {sum(map(len, prompts)) / len(prompts):.0f}), k={args.k}, {args.batch_size} prompts per call, "
          f"up to {args.max_new_tokens} new tokens, temperature {args.temperature}, top_p {args.top_p}")
    sides = {"ours": run_ours, "peer": run_peer}
    for fn in sides.values():  # warm up (allocator, kernels) on a single call
        fn(model, tokenizer, prompts[: args.batch_size], args)
    best: dict[str, tuple[float, int, int]] = {}
    for rep in range(args.repeats):
        for name, fn in sides.items():
            seconds, n_samples, n_tokens = timed(fn, device, model, tokenizer, prompts, args)
            print(f"  run {rep + 1} {name}: {seconds:.2f} s, {n_samples} samples, {n_tokens} tokens")
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, n_samples, n_tokens)
    rates = {name: (b[1] / b[0], b[2] / b[0]) for name, b in best.items()}
    for name, label in (("ours", "ours (align hf backend, shared prefill)"),
                        ("peer", "peer (generate, num_return_sequences)")):
        print(f"{label}: best {best[name][0]:.2f} s -> {rates[name][0]:.2f} samples/s, "
              f"{rates[name][1]:.0f} new tokens/s")
    emit_json({
        "bench": "rejection_sampling",
        "ours": rounded(rates["ours"][0]),
        "peer": rounded(rates["peer"][0]),
        "unit": "samples/s",
        "ratio": rounded(ratio(rates["ours"][0], rates["peer"][0])),
        "ours_tokens_per_s": rounded(rates["ours"][1]),
        "peer_tokens_per_s": rounded(rates["peer"][1]),
        "model": desc,
        "config": f"{len(prompts)} prompts {len(prompts[0])}-{len(prompts[-1])} tokens, k={args.k}, "
                  f"batch {args.batch_size} prompts, max_new_tokens {args.max_new_tokens}, "
                  f"T={args.temperature}, top_p={args.top_p}, best of {args.repeats}, device {device}",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
