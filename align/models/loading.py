"""Load and save models: a local path or hub id via ``from_pretrained``, or the built-in tiny Llama.

Saved checkpoints are plain HF folders (``save_pretrained`` + tokenizer): ``AutoModelForCausalLM``
loads them with no align code. With LoRA, the merged model is saved there and the adapter in ``adapter/``.
Each gets an ``align_manifest.json`` (every file's SHA-256, :mod:`align.checksums`), written last; a folder
that has one is verified before it is loaded, so a file damaged on disk stops the stage that reads it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from align.checksums import MANIFEST, verify_model_folder, write_manifest
from align.compat import enable_activation_checkpointing
from align.config.specs import ModelSpec, builtin_tokenizers
from align.data.chat import EOT, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, build_builtin_tokenizer
from align.models.gguf import hf_folder

BUILTIN_MODEL = "builtin:tiny"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class NoChatTemplate(UserWarning):
    """A tokenizer came without a chat template and the Llama 3 template is used."""


def load_tokenizer(spec: ModelSpec, model_path: str):
    """The tokenizer for ``spec``; adds the Llama 3 chat template (and its special tokens) if missing."""
    source = spec.tokenizer or hf_folder(spec, model_path)
    if source == BUILTIN_MODEL or source in builtin_tokenizers():  # align.data.chat.build_builtin_tokenizer
        return build_builtin_tokenizer("builtin:bytes" if source == BUILTIN_MODEL else source)
    verify_model_folder(source)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if not getattr(tok, "chat_template", None):
        missing = [t for t in LLAMA3_SPECIAL_TOKENS if t not in tok.get_vocab()]
        warnings.warn(f"the tokenizer of {source} has no chat template: align uses the Llama 3 template"
                      + (f" and adds its special tokens {missing} (the embeddings grow)" if missing else "")
                      + "; give a tokenizer with a template (model.tokenizer) to use another", NoChatTemplate,
                      stacklevel=2)
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
        tok.chat_template = LLAMA3_CHAT_TEMPLATE
        if tok.bos_token is None:
            tok.bos_token = "<|begin_of_text|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_model(spec: ModelSpec, vocab_size: int, seed: int = 0):
    """The built-in randomly initialised Llama, sized by ``spec.tiny``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = spec.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
        rms_norm_eps=1e-5,
    )
    if spec.attn_implementation:
        config._attn_implementation = spec.attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    dtype = _DTYPES[spec.dtype]
    return model.to(dtype) if dtype != "auto" else model


def load_causal_lm(spec: ModelSpec, model_path: str, tokenizer, seed: int = 0):
    """A causal LM ready to train: loaded or built, embeddings sized to the tokenizer, LoRA and
    gradient checkpointing applied as asked."""
    if model_path == BUILTIN_MODEL:
        model = build_tiny_model(spec, len(tokenizer), seed)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": _DTYPES[spec.dtype]}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        folder = hf_folder(spec, model_path)
        verify_model_folder(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is not None and eot != tokenizer.unk_token_id:
        model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if spec.lora is not None:
        model = apply_lora(model, spec)
    return model


def apply_lora(model, spec: ModelSpec):
    from align.compat import get_peft_model

    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(spec.lora, model, "CAUSAL_LM"))


def lora_config(lora, model, task_type: str):
    """peft's ``LoraConfig`` for ``lora`` (a :class:`align.config.specs.LoraConfig`). With ``last_layers: N``
    only the last N decoder layers get adapters (peft's ``layers_to_transform``; ``all-linear`` becomes the
    names of the linear layers inside the decoder layers, which peft needs for it): nothing below them needs
    a gradient, so the backward pass stops there."""
    from peft import LoraConfig

    targets, layers = lora.target_modules, None
    if lora.last_layers is not None:
        total = model.config.num_hidden_layers
        if lora.last_layers > total:
            raise ValueError(f"lora.last_layers={lora.last_layers}: the model has {total} decoder layers")
        layers = list(range(total - lora.last_layers, total))
        if targets == "all-linear":
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      layers_to_transform=layers, task_type=task_type)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_checkpoint(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save an HF checkpoint that plain ``transformers`` loads. LoRA: adapter to ``adapter/``, then the
    merged weights (the model passed in is merged in place, so call this last). ``state_dict``: the whole
    weights when training sharded them (:func:`align.train.sharded.full_state_dict`). The folder's
    ``align_manifest.json`` is removed first and written last: call :func:`align.checksums.write_manifest`
    again after adding files to the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder being written is not one that was verified
    if is_peft(model):
        if state_dict is not None:
            raise ValueError("saving a LoRA model trained with sharded weights (ZeRO-3/FSDP) is not supported: "
                             "train LoRA under DDP (its weights are small) or fully fine-tune under ZeRO-3/FSDP")
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    write_manifest(out)
    return out


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def plain_weights(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``model`` as the plain HF model it stands for (the names
    ``save_pretrained`` writes, tied weights once): a LoRA model's adapters merged in (a copy of each
    adapted weight; the model itself is left as it was). For an inference engine that takes new weights,
    e.g. vLLM during PPO."""
    if not is_peft(model):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    out = []
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        out.append((plain, merged.get(plain, p.detach())))
    return out
