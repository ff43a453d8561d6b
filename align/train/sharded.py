"""Whole weights for generation when training shards them.

Under DeepSpeed ZeRO-3 every forward pass gathers each layer's parameters from all processes and frees them
again; token-by-token generation would do that once per token (the Llama 2 paper reports a 20x slowdown).
:func:`gathered_for_generation` gathers them once for the whole rollout (what TRL's
``unwrap_model_for_generation`` does), and is a no-op in every other setting (one process, DDP, ZeRO-1/2,
whose parameters are whole on every process). FSDP2 is not gathered here: its forward unshards layer by
layer, which is correct and slower; see docs/scaling.md.
"""

from __future__ import annotations

import contextlib


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of ``accelerator`` (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def gathered_for_generation(accelerator, model):
    """Inside: ``model``'s parameters are whole on every process (ZeRO-3: gathered once, not modified)."""
    if zero_stage(accelerator) != 3:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield model


def is_sharded(accelerator) -> bool:
    """Parameters split across processes: DeepSpeed ZeRO-3 or FSDP (a module's own weights are then not whole)."""
    return zero_stage(accelerator) == 3 or str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def full_state_dict(accelerator, model, prefix: str) -> dict | None:
    """The whole weights of ``model``'s submodule ``prefix`` (e.g. ``lm`` of the wrapper a stage trains), for
    ``save_pretrained(state_dict=...)``, gathered from every process when training shards them (accelerate's
    ``get_state_dict``: ZeRO-3's 16-bit gather, FSDP's full state dict). Every process must call it; the main
    process gets the dict. None when nothing is sharded (the module's own weights are whole)."""
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    if state is None:
        return None
    head = f"{prefix}."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
