"""The frozen lower layers run once (``align.models.trunk``): the same work with and without, one process.

With LoRA on the last 8 of 30 layers (SmolLM2-135M's shape: hidden 576, MLP 1536, 9/3 heads, 49,152-token
vocabulary, tied head; random weights, no download), the three places that use it, each timed whole models
(``off``) against the layers above the shared ones (``on``), same inputs, same seed:

- ``dpo_step``: a DPO training step (8 pairs of a 60-token prompt and two 32-token answers, forward and
  backward); the ``on`` side reads states kept from the reference pass (its one-time cost is
  ``reference_pass``: the pass with and without keeping them);
- ``ppo_iteration``: one rollout's log-probs, values and reference log-probs (32 rows), then 2 epochs of
  2 minibatches of 16 (forward and backward of policy and value model); sampling excluded;
- ``eval_kl``: the evaluation's exact KL of 64 answers, policy (merged) vs reference (the LM head only at
  the answers on both sides).

    python bench/trunk.py                     # about 3 minutes on 2 CPU cores
    python bench/trunk.py --dtype bfloat16    # the weights in bf16 (the sentiment recipe's precision)

The last line printed is the JSON result; each ``*_ratio`` = time off / time on (> 1: the trunk is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit_json, rounded  # noqa: E402

SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "max_position_embeddings": 512, "tie_word_embeddings": True}
VOCAB = 49152


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def models(last_layers: int, dtype: str = "float32"):
    from align.compat import get_peft_model
    from align.config.specs import ModelSpec
    from align.models.loading import build_tiny_model, lora_config
    from align.models.reward import seq_cls_from_causal

    spec = ModelSpec(path="builtin:tiny", tiny=SHAPE, lora={"r": 16, "alpha": 32, "last_layers": last_layers},
                     dtype=dtype)
    base = build_tiny_model(spec, VOCAB, 0)
    policy = get_peft_model(base, lora_config(spec.lora, base, "CAUSAL_LM"))
    critic = seq_cls_from_causal(build_tiny_model(spec, VOCAB, 0), 0)
    value = get_peft_model(critic, lora_config(spec.lora, critic, "SEQ_CLS"))
    reference = build_tiny_model(spec, VOCAB, 0).requires_grad_(False).eval()
    with torch.no_grad():  # adapters as after training (LoRA's B starts at 0)
        for m in (policy, value):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return policy, value, reference


def dpo(policy, k: int, repeats: int) -> dict:
    from align.data.preference import PreferenceExample, collate_pairs
    from align.models.logps import TokenLogps
    from align.train.reference import logps_and_trunks

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    examples = [PreferenceExample(ids(60), [ids(32), ids(32)], [[True] * 32] * 2, [(0, 1)]) for _ in range(8)]
    with policy.disable_adapter():
        ref_off = best_of(lambda: logps_and_trunks(TokenLogps(policy), examples, 8, 0, "cpu"), repeats)
        ref_on = best_of(lambda: logps_and_trunks(TokenLogps(policy), examples, 8, 0, "cpu", trunk_layers=k),
                         repeats)
        trunks = logps_and_trunks(TokenLogps(policy), examples, 8, 0, "cpu", trunk_layers=k)[2]
    batch = collate_pairs(examples, 0, next(policy.parameters()).dtype, trunks=trunks)

    def step(layers, inputs):
        policy.zero_grad()
        TokenLogps(policy, layers)(*inputs).sum().backward()

    off = best_of(lambda: step(0, batch.model_inputs()[:5]), repeats)
    on = best_of(lambda: step(k, batch.model_inputs()), repeats)
    return {"dpo_step_off_s": off, "dpo_step_on_s": on, "dpo_step_ratio": off / on,
            "reference_pass_off_s": ref_off, "reference_pass_on_s": ref_on}


def ppo(policy, value, reference, k: int, repeats: int) -> dict:
    from align.models.policy_value import PolicyAndValue
    from align.train.rollouts import build_rollout

    g = torch.Generator().manual_seed(1)
    samples = [SimpleNamespace(prompt_ids=torch.randint(5, VOCAB, (60,), generator=g).tolist(),
                               token_ids=torch.randint(5, VOCAB, (32,), generator=g).tolist()) for _ in range(32)]
    stage = SimpleNamespace(sampling=SimpleNamespace(temperature=1.0), train=SimpleNamespace(batch_size=16),
                            kl_estimator="k1", gamma=1.0, lam=0.95, whiten_advantages=True)
    acc = SimpleNamespace(device="cpu", autocast=contextlib.nullcontext, unwrap_model=lambda m: m, num_processes=1)
    module = PolicyAndValue(policy, value)

    def iteration(layers):
        module.trunk_layers = layers
        rollout, _ = build_rollout(module, reference, samples, torch.zeros(32), 0.05, stage, acc, 0)
        for epoch in range(2):
            for mb in rollout.minibatches(16, torch.Generator().manual_seed(epoch)):
                module.zero_grad()
                logits, values = module(mb.sequences, mb.attention_mask, mb.response_mask, trunk=mb.trunk)
                (logits.logsumexp(-1).mean() + values.sum()).backward()

    off, on = best_of(lambda: iteration(0), repeats), best_of(lambda: iteration(k), repeats)
    return {"ppo_iteration_off_s": off, "ppo_iteration_on_s": on, "ppo_iteration_ratio": off / on}


def eval_kl(policy, reference, repeats: int) -> dict:
    from align.data.chat import build_byte_tokenizer
    from align.models import kl as kl_module

    merged = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    merged.requires_grad_(False).eval()
    tok = build_byte_tokenizer()  # ids < 262 of the 49,152: the model's cost is the same
    prompts = [[{"role": "user", "content": f"Continue this text, please: {i} " + "words " * 6}] for i in range(64)]
    answers = [f"and then the {i}th thing happened" for i in range(64)]

    def run():
        return kl_module.kl_to_reference(merged, reference, tok, prompts, answers, [False] * 64)

    on = best_of(run, repeats)
    original = kl_module.shared_layers
    kl_module.shared_layers = lambda *models: 0  # whole models (the LM head still only at the answers)
    try:
        off = best_of(run, repeats)
    finally:
        kl_module.shared_layers = original
    return {"eval_kl_off_s": off, "eval_kl_on_s": on, "eval_kl_ratio": off / on}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--last-layers", type=int, default=8, help="LoRA on this many top layers")
    p.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the models' weights")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    policy, value, reference = models(args.last_layers, args.dtype)
    k = SHAPE["num_hidden_layers"] - args.last_layers
    out = {"bench": "trunk", "dtype": args.dtype, "threads": torch.get_num_threads(), "shared_layers": k}
    out.update(dpo(policy, k, args.repeats))
    out.update(ppo(policy, value, reference, k, args.repeats))
    out.update(eval_kl(policy, reference, args.repeats))
    emit_json({k: rounded(v) if isinstance(v, float) else v for k, v in out.items()})


if __name__ == "__main__":
    main()
