"""Frozen lower decoder layers computed once for every model that has them.

Under LoRA on the top layers only (``lora.last_layers``) the layers below are frozen copies of the base
model's, and so are the reference's and (when it starts from the same model) the value model's: on the same
tokens they all compute the same hidden states there. :func:`shared_layers` finds how many leading layers
(with the token embeddings) a set of models has equal and frozen; :func:`trunk_states` runs those layers
once; inside :func:`from_layer` a decoder called with ``inputs_embeds=<those states>`` runs only the layers
above them (and its final norm). PPO then computes the trunk once per rollout instead of three times per
rollout and twice per training step, and the evaluation's KL runs it once for policy and reference.

Exact: the layers above see the very hidden states they would have computed (tested equal to the whole
model). Used for decoders whose forward hands ``inputs_embeds`` to the first layer unchanged (Llama,
Mistral, Qwen2: :data:`DECODERS`); elsewhere :func:`shared_layers` is 0 and nothing changes. A model
wrapped for DDP or FSDP is not unwrapped here: callers use it on plain modules.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from align.models.last_layer import hidden_at

DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model")
TRUNK_BYTES = 4 << 30  # the most hidden states a stage keeps (CPU memory, and DPO's cache) to skip the layers


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``) of an HF causal LM or sequence-scoring
    model, PEFT-wrapped or not; None when it is not one of :data:`DECODERS`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    return decoder if type(decoder).__name__ in DECODERS else None


def shared_layers(*models: nn.Module) -> int:
    """How many leading decoder layers every model has frozen (no trainable parameter) and equal (same
    parameter values, token embeddings and rotary frequencies included) and free of dropout: 0 when any is
    not a supported decoder or they differ below the first layer."""
    decoders = [decoder_of(m) for m in models]
    if not decoders or any(d is None for d in decoders):
        return 0
    first, rest = decoders[0], decoders[1:]
    if not all(_frozen(d.embed_tokens) and _equal(first.embed_tokens, d.embed_tokens) for d in decoders) or \
            not all(_equal(first.rotary_emb, d.rotary_emb, buffers=True) for d in rest):
        return 0
    n = 0
    for layers in zip(*(d.layers for d in decoders), strict=False):
        if not all(_frozen(x) and _no_dropout(x) and _equal(layers[0], x) for x in layers):
            break
        n += 1
    return n


def _no_dropout(layer: nn.Module) -> bool:
    """No random op in training mode (what runs once in eval mode must be what training would run)."""
    attn = getattr(layer, "self_attn", None)
    return getattr(attn, "attention_dropout", 0.0) == 0 and \
        not any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _equal(a: nn.Module, b: nn.Module, buffers: bool = False) -> bool:
    if a is b:
        return True
    pa = dict(a.named_buffers() if buffers else a.named_parameters())
    pb = dict(b.named_buffers() if buffers else b.named_parameters())
    return pa.keys() == pb.keys() and all(
        pa[k].shape == pb[k].shape and pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k].to(pa[k].device))
        for k in pa)


@contextmanager
def _only_layers(decoder: nn.Module, layers: slice, final_norm: bool):
    """Within: the decoder runs ``layers`` of its stack only, and its final norm when ``final_norm``."""
    stack, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(stack)[layers])
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield decoder
    finally:
        decoder.layers, decoder.norm = stack, norm


@torch.no_grad()
def trunk_states(model: nn.Module, k: int, **inputs) -> torch.Tensor:
    """(B, T, H): the hidden states after the first ``k`` decoder layers (before the final norm);
    ``inputs``: input_ids, attention_mask, position_ids as the whole model would get them."""
    decoder = decoder_of(model)
    with _only_layers(decoder, slice(0, k), final_norm=False):
        return decoder(**inputs, use_cache=False).last_hidden_state


@contextmanager
def from_layer(decoder: nn.Module, k: int):
    """Within: ``decoder(inputs_embeds=trunk_states(..., k), ...)`` runs layers k.. and the final norm
    (what the whole decoder returns on the same tokens)."""
    with _only_layers(decoder, slice(k, None), final_norm=True):
        yield decoder


def hidden_from(decoder: nn.Module, index: torch.Tensor, trunk: torch.Tensor | None, k: int, *, prune: bool = True,
                input_ids=None, **inputs) -> torch.Tensor:
    """:func:`align.models.last_layer.hidden_at` (the final hidden states at ``index``: (N, H)), from the
    states after layer ``k`` when ``trunk`` is given, else from ``input_ids``."""
    if trunk is None:
        return hidden_at(decoder, index, prune=prune, input_ids=input_ids, **inputs)
    with from_layer(decoder, k):
        return hidden_at(decoder, index, prune=prune, inputs_embeds=trunk, **inputs)


def trunk_layers_to_keep(model: nn.Module, tokens: int, processes: int = 1) -> int:
    """How many lower layers a stage training ``model`` runs once per record and keeps (0: none): its frozen
    ones, when one process trains, some layer above them trains and ``tokens`` positions of states fit in
    :data:`TRUNK_BYTES`."""
    decoder = decoder_of(model)
    if decoder is None or processes > 1:
        return 0
    k = shared_layers(model)
    if not k or k >= len(decoder.layers):  # all frozen: nothing trains; the last layer may be cut short
        return 0
    return k if tokens * decoder.config.hidden_size * next(model.parameters()).dtype.itemsize <= TRUNK_BYTES else 0


@torch.no_grad()
def shared_row_trunks(model: nn.Module, rows, k: int, batch_size: int, pad_id: int, device,
                      autocast=nullcontext) -> list[torch.Tensor]:
    """Per shared-prompt row (:mod:`align.data.shared_prompt`), its hidden states after layer ``k``: (its
    length, H), on the CPU; computed in packed batches of ``batch_size`` rows."""
    from align.data.collate import length_sorted_groups
    from align.data.shared_prompt import collate_shared, record_states

    dtype = next(model.parameters()).dtype
    out: list[torch.Tensor | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for group in length_sorted_groups([len(r.input_ids) for r in rows], batch_size):
            members = [rows[i] for i in group]
            batch = collate_shared(members, pad_id, dtype)
            with autocast():
                states = trunk_states(model, k, input_ids=batch.input_ids.to(device),
                                      position_ids=batch.position_ids.to(device),
                                      attention_mask=batch.attention_mask.to(device))
            for i, state in zip(group, record_states(states.cpu(), members), strict=True):
                out[i] = state
    finally:
        model.train(was_training)
    return out
