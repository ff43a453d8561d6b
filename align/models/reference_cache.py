"""A disk cache for values computed from a model (reference log-probs), keyed by a hash of what made them.

    values, hit = load_or_compute(run_dir / "ref_cache", [version, model_identity(spec, path, seed), ...],
                                  compute, accelerator=accelerator)

The file is ``<cache_dir>/<key>.pt`` holding ``{"key": key, "values": values}``; ``key`` is the first 24
hex digits of the SHA-256 of the key parts fed in order. It is written to ``<key>.tmp`` and renamed, so
it exists only when complete, and read with ``torch.load(weights_only=True)`` (values: tensors and
plain Python containers of numbers and strings). Multi-process: the main process computes and writes,
the others wait for it and read the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from align.config.specs import ModelSpec
from align.models.loading import BUILTIN_MODEL

# A key part: text or bytes, or a function that feeds a hash object itself (``part(h)`` calls
# ``h.update(bytes)``; for large inputs, hashed as they are read).
KeyPart = str | bytes | Callable[[Any], None]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_identity(spec: ModelSpec, path: str, seed: int) -> str:
    """A string that changes whenever the model's weights (or how they are computed with) change: the
    weight and config files' content for a local folder; the size config and seed for ``builtin:tiny``;
    the id for a hub model (pin a revision by downloading it to a folder); plus dtype and attention."""
    h = hashlib.sha256()
    h.update(f"dtype={spec.dtype};attn={spec.attn_implementation}".encode())
    if path == BUILTIN_MODEL:
        h.update(f"builtin;{spec.tiny.model_dump_json()};seed={seed}".encode())
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
        for p in files:
            h.update(p.name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(chunk)
    else:
        h.update(f"hub:{path}".encode())
    return h.hexdigest()


def cache_key(parts: Iterable[KeyPart]) -> str:
    """24 hex digits of the SHA-256 of the parts, fed in order."""
    h = hashlib.sha256()
    for part in parts:
        if callable(part):
            part(h)
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:24]


def load_or_compute(
    cache_dir: str | Path, key_parts: Iterable[KeyPart], compute: Callable[[], Any], *,
    accelerator=None, meta: dict | None = None,
) -> tuple[Any, bool]:
    """-> (values, hit). On a miss the main process calls ``compute()`` and saves its values (with
    ``meta``, when given, in ``<key>.json`` beside them for people). ``accelerator``: anything with
    ``is_main_process`` and ``wait_for_everyone()`` (accelerate's); None for a single process."""
    key = cache_key(key_parts)
    path = Path(cache_dir) / f"{key}.pt"
    hit = path.exists()
    if not hit and (accelerator is None or accelerator.is_main_process):
        values = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "values": values}, tmp)
        tmp.replace(path)  # atomic: the file exists only when complete
        if meta is not None:
            path.with_suffix(".json").write_text(json.dumps(meta))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return torch.load(path, weights_only=True)["values"], hit
