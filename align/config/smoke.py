"""A recipe shrunk to a smoke-test size: the same stages, settings and wiring, on a 2-layer built-in model, a
few hundred examples and a few steps, so a whole recipe runs in about a minute on a CPU (what the notebooks
run in CI with ``ALIGN_NOTEBOOK_SIZE=small``). Works on the recipe as loaded from YAML (a dict), before
validation; the numbers it produces mean nothing."""

from __future__ import annotations

import copy

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def shrink(recipe: dict, tiny_model: bool = False) -> dict:
    """A copy of ``recipe`` (a dict) at smoke size. ``tiny_model``: every model given by path (a local
    folder, a GGUF file, a hub id) becomes the 2-layer built-in one too, with the world's tokenizer (CI has
    no pretrained model); LoRA stays on, on every layer."""
    recipe = copy.deepcopy(recipe)
    for s in recipe["stages"]:
        if tiny_model:
            _tiny_models(s)
        model = s.get("model") or {}
        if model.get("path") == "builtin:tiny":
            s["model"] = {**model, "tiny": TINY}
        _shrink_stage(s, s["kind"], s.get("train") or {}, model)
    return recipe


def _tiny_models(s: dict) -> None:
    """Every model spec of stage ``s`` (a dict) that names a path: the built-in tiny model instead; and no
    spec keeps ``lora.last_layers`` (the tiny model has fewer layers), one read from a stage included."""
    holders = [s, s.get("reward") or {}]
    for holder in holders:
        for key in ("model", "reference", "value_model", "helpful", "safety"):
            spec = holder.get(key)
            if not isinstance(spec, dict):
                continue
            lora = {k: v for k, v in (spec.get("lora") or {}).items() if k != "last_layers"}
            if spec.get("path") and not str(spec["path"]).startswith("builtin:"):
                holder[key] = {"path": "builtin:tiny", "tokenizer": "builtin:world", "tiny": TINY,
                               **({"lora": lora} if spec.get("lora") else {}),
                               **({"dtype": spec["dtype"]} if spec.get("dtype") else {})}  # bf16 runs as bf16
            elif spec.get("lora"):
                holder[key] = {**spec, "lora": lora}


def _shrink_stage(s: dict, kind: str, train: dict, model: dict) -> None:
    """Shrink one stage (a dict) in place: its data, samples and steps."""
    if kind in ("sft", "reward_model"):
        _shrink_supervised(s, kind, train, model)
    elif kind == "rejection_sampling":
        s.update(k=min(s.get("k", 4), 4), prompts={"builtin": "world", "builtin_size": 32}, min_pair_gap=0.0)
        if s.get("best_of"):
            s["best_of"] = sorted({min(n, s["k"]) for n in s["best_of"]})
        s["sampling"] = {**(s.get("sampling") or {}), "max_new_tokens": 16}
    elif kind == "gatt":
        s["dialogues"] = {**s["dialogues"], "builtin_size": 16}
        s["sampling"] = {**(s.get("sampling") or {}), "max_new_tokens": 16}
    elif kind == "dpo":
        s["train"] = {**train, "max_steps": 4, "snapshot_every": 2 if train.get("snapshot_every") else 0}
    elif kind == "ppo":
        s.update(iterations=4, rollout_batch_size=16, prompts={"builtin": "world", "builtin_size": 64})
        s["sampling"] = {**(s.get("sampling") or {}), "max_new_tokens": 16}
        s["train"] = {**train, "snapshot_every": 2 if train.get("snapshot_every") else 0}
    elif kind == "evaluate":
        s["prompts"] = {"builtin": "world_eval", "builtin_size": 24}
        if s.get("retention"):
            s["retention"] = {**s["retention"], "dialogues": min(s["retention"].get("dialogues", 16), 16)}


def _shrink_supervised(s: dict, kind: str, train: dict, model: dict) -> None:
    s["train"] = {**train, "epochs": 1, "save_every": 0}
    data = s.get("data") or {}
    if data.get("builtin"):
        s["data"] = {**data, "builtin_size": 300 if kind == "sft" else 120}
    if kind == "sft" and data.get("builtin") and model.get("tokenizer") == "builtin:world":
        # whole-word tokens: after 300 chats the policy writes answers that never end and the gold
        # judge has nothing to rank into DPO pairs; 1,200 chats a row a step teach it to end them
        s["data"]["builtin_size"] = 1200
        s["train"]["batch_size"] = 1
