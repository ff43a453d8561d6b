"""Reference log-probs for DPO: computed once before training, cached on disk, keyed by what made them.

The cache (:mod:`align.models.reference_cache`) lives in ``<run_dir>/ref_cache/<key>.pt`` (outside the stage
folder, which the runner clears when the stage's config changes). The key hashes:

- the reference model (:func:`~align.models.reference_cache.model_identity`): its weight and config files'
  content for a local folder (so the same path with retrained weights is another key; the files' digests are
  remembered in ``ref_cache/file_digests.json`` while their size, times and inode stay the same, so a large
  model is read once, not on every run); the GGUF file for a ``gguf_file`` spec; the size config and seed
  for ``builtin:tiny``; the id and cached revision for a hub model (pin a revision by downloading it to a
  folder); plus dtype, attention implementation and the autocast precision;
- the tokenized data: every prompt and response id and the DPO mask, so the data, the tokenizer, the
  truncation length, the pairs mode and the formatting-token setting are all in it.

Which model computes them: an explicit ``reference`` is loaded, used and freed before training; by default
the reference is the policy's starting point, so the policy itself computes them before its first step
(with LoRA: with the adapter disabled). Multi-process: the main process computes and writes the file, the
others wait and read it (simple; it leaves the other processes idle for that pass).

The same pass keeps what the frozen lower layers compute (LoRA on the top layers only: ``lora.last_layers``):
each example's hidden states after them, cached with the log-probs (up to :data:`align.models.trunk.TRUNK_BYTES`), so every
training step and every DPO stage on the same data and start (a beta grid) runs only the layers above them
(:mod:`align.models.trunk`; exact).
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from align.config.dpo import DPOStage
from align.data.collate import length_sorted_groups
from align.data.preference import PreferenceExample, collate_pairs, examples_digest
from align.data.shared_prompt import build_row, record_states
from align.losses.dpo import response_sums
from align.models.inference import no_grad_map
from align.models.loading import is_peft, load_causal_lm
from align.models.logps import TokenLogps
from align.models.reference_cache import KeyPart, load_or_compute, model_identity
from align.models.trunk import decoder_of, trunk_layers_to_keep
from align.runtime import StageContext

CACHE_VERSION = "dpo-ref-2"  # 2: {"logps", "trunks"}


def key_parts(model_id: str, mixed_precision: str, splits: Sequence[Sequence[PreferenceExample]]) -> list[KeyPart]:
    """What the cache key hashes: the version, the reference model's identity, the autocast precision
    and every split's tokenized examples."""
    parts: list[KeyPart] = [f"{CACHE_VERSION};{model_id};amp={mixed_precision}"]
    for examples in splits:
        parts += [f"split:{len(examples)}", functools.partial(examples_digest, examples)]
    return parts


def compute_response_logps(
    model: TokenLogps, examples: Sequence[PreferenceExample], batch_size: int, pad_id: int,
    device, autocast=contextlib.nullcontext,
) -> tuple[list[list[float]], int]:
    """DPO-masked log-prob sum of every response: -> (per example, per response), forward passes."""
    out, passes, _ = logps_and_trunks(model, examples, batch_size, pad_id, device, autocast)
    return out, passes


def logps_and_trunks(
    model: TokenLogps, examples: Sequence[PreferenceExample], batch_size: int, pad_id: int,
    device, autocast=contextlib.nullcontext, trunk_layers: int = 0,
) -> tuple[list[list[float]], int, list[torch.Tensor] | None]:
    """:func:`compute_response_logps`, and with ``trunk_layers`` k > 0 each example's hidden states after
    decoder layer k (its row's length, H) from the same pass, on the CPU (:mod:`align.models.trunk`)."""
    dtype = next(model.parameters()).dtype
    groups = length_sorted_groups([len(ex) for ex in examples], batch_size)
    captured = []
    hook = trunk_layers and decoder_of(model.lm).layers[trunk_layers - 1].register_forward_hook(
        lambda mod, args, output: captured.append(output[0] if isinstance(output, tuple) else output))

    def make_batch(group):
        return collate_pairs([examples[i] for i in group], pad_id, dtype).to(device)

    out, trunks, passes = [None] * len(examples), [None] * len(examples), 0
    try:
        results = no_grad_map(model, groups, make_batch, lambda m, b: m(*b.model_inputs()), autocast)  # (N,)
        for group, (batch, logps) in zip(groups, results, strict=True):
            sums = response_sums(logps.float(), batch.tokens.owner, batch.num_responses, batch.dpo_mask).tolist()
            passes += 1
            if trunk_layers:
                rows = [build_row(examples[i].prompt_ids, examples[i].responses) for i in group]
                for i, state in zip(group, record_states(captured.pop().cpu(), rows), strict=True):
                    trunks[i] = state
            for i in group:
                n = len(examples[i].responses)
                out[i] = sums[:n]
                sums = sums[n:]
    finally:
        if hook:
            hook.remove()
    return out, passes, trunks if trunk_layers else None


class Reference(NamedTuple):
    """DPO's reference values: per split, per example, per response log-prob sums; per split, per example,
    the hidden states after the ``trunk_layers`` frozen lower layers (None when not kept); and
    ``{"ref_cache_hit": 0/1, "ref_forward_passes": n, "trunk_layers": k}``."""

    logps: list
    trunks: list | None
    info: dict


def trunk_layers_for(stage: DPOStage, lm, splits, accelerator) -> int:
    """How many lower layers of the policy DPO runs once (in the reference pass) and caches: its frozen ones
    (:func:`align.models.trunk.trunk_layers_to_keep`), when the reference is the policy's start (adapter
    off: the same lower layers)."""
    if lm is None or stage.reference is not None:
        return 0
    return trunk_layers_to_keep(lm, sum(len(ex) for examples in splits for ex in examples), accelerator.num_processes)


def reference_logps(stage: DPOStage, ctx: StageContext, lm, tokenizer, splits, accelerator) -> Reference:
    """The reference values of ``splits``, from the cache when the key matches, else computed and saved."""
    spec = stage.reference or stage.model
    path = ctx.model_path(spec)
    cache_dir = Path(ctx.recipe.run_dir) / "ref_cache"
    identity = model_identity(spec, path, ctx.seed, memo=cache_dir / "file_digests.json")
    k = trunk_layers_for(stage, lm, splits, accelerator)
    parts = key_parts(identity, stage.train.mixed_precision, splits) + [f"trunk_layers={k}"]
    passes = 0

    def compute():
        nonlocal passes
        values, trunks, passes = _compute(stage, spec, path, ctx.seed, lm, tokenizer, splits, accelerator, k)
        return {"logps": values, "trunks": trunks}

    values, hit = load_or_compute(cache_dir, parts, compute,
                                  accelerator=accelerator, meta={"stage": stage.name, "model": path})
    return Reference(values["logps"], values["trunks"],
                     {"ref_cache_hit": float(hit), "ref_forward_passes": float(passes), "trunk_layers": float(k)})


def _compute(stage, spec, path, seed, lm, tokenizer, splits, accelerator, k: int):
    bs, pad, device = stage.train.batch_size, tokenizer.pad_token_id, accelerator.device

    def run(model):
        values, trunks, passes = [], [], 0
        for examples in splits:
            v, n, t = logps_and_trunks(TokenLogps(model), examples, bs, pad, device, accelerator.autocast, k)
            values.append(v)
            trunks.append(t)
            passes += n
        return values, trunks if k else None, passes

    if stage.reference is None:  # the policy's starting point: the policy itself, before training
        adapter_off = lm.disable_adapter() if is_peft(lm) else contextlib.nullcontext()
        with adapter_off:
            return run(lm.to(device))
    plain = spec.model_copy(update={"lora": None, "gradient_checkpointing": False})
    ref = load_causal_lm(plain, path, tokenizer, seed=seed).to(device)
    ref.requires_grad_(False)
    try:
        return run(ref)
    finally:  # free it before training
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
