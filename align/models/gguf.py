"""GGUF checkpoints (llama.cpp's format, e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``) as plain HF folders.

A recipe names one with ``model: {path: DIR, gguf_file: NAME}``. The first stage that needs it converts it
once, with transformers' GGUF reader (the ``gguf`` package): weights dequantized, the tokenizer and its chat
template read from the same file, the quantization config dropped (``save_pretrained`` refuses a model that
still carries it), saved with ``save_pretrained`` into a cache folder keyed by the file's path, size and
modification time. Every loader then reads that folder, and everything align saves afterwards is a plain HF
folder that ``transformers`` loads without ``gguf``. Concurrent processes convert once (a file lock).

Cache: ``$ALIGN_CACHE`` or ``~/.cache/align``, under ``gguf/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from align.config.specs import ModelSpec


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")


def converted_folder(path: str, gguf_file: str) -> Path:
    """Where ``path/gguf_file`` is (or will be) converted to."""
    source = (Path(path).expanduser() / gguf_file).resolve()
    st = source.stat()
    key = hashlib.sha256(f"{source}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{source.stem}-{key}"


def convert_gguf(path: str, gguf_file: str, out: Path) -> Path:
    """Convert ``path/gguf_file`` into the HF folder ``out`` (float32 weights, tokenizer, chat template);
    written beside and renamed into place, so ``out`` exists only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(Path(path).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    drop_quantization(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "align_source.json").write_text(json.dumps({"gguf": str(Path(source) / gguf_file)}))
    tmp.rename(out)
    return out


def drop_quantization(model) -> None:
    """Forget that the weights came from a quantized file: they are dequantized tensors now."""
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False


def hf_folder(spec: ModelSpec, path: str) -> str:
    """``path`` itself, or for a GGUF spec its converted folder (converted on first use)."""
    if not spec.gguf_file or path != spec.path:
        return path  # another stage's output, or a plain folder / hub id
    out = converted_folder(path, spec.gguf_file)
    if out.is_dir():
        return str(out)
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.is_dir():
            print(f"[gguf] converting {Path(path) / spec.gguf_file} into {out} (once)")
            convert_gguf(path, spec.gguf_file, out)
    return str(out)
