"""A disk cache for values computed from a model (reference log-probs), keyed by a hash of what made them.

    values, hit = load_or_compute(run_dir / "ref_cache", [version, model_identity(spec, path, seed), ...],
                                  compute, accelerator=accelerator)

The model's part of the key (:func:`model_identity`) hashes the content of its weight and config files, so
a folder retrained in place (same path, new weights) gets a new key. Reading every weight byte on every run
costs time on large models, so a file's SHA-256 is remembered in a small JSON file (``memo``) together with
the file's size, modification and change times (ns) and inode, and reused only while all of them are the
same; any write to the file changes its change time, which no tool can set back. A digest is remembered only
once the file is 2 s older than the hashing (a write within the file system's time resolution could
otherwise go unseen) and unchanged while it was read.

The file is ``<cache_dir>/<key>.pt`` holding ``{"key": key, "values": values}``; ``key`` is the first 24
hex digits of the SHA-256 of the key parts fed in order. It is written to ``<key>.tmp`` and renamed, so
it exists only when complete, and read with ``torch.load(weights_only=True)`` (values: tensors and
plain Python containers of numbers and strings). Multi-process: the main process computes and writes,
the others wait for it and read the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from align.checksums import sha256_file
from align.config.specs import ModelSpec
from align.models.loading import BUILTIN_MODEL

# A key part: text or bytes, or a function that feeds a hash object itself (``part(h)`` calls
# ``h.update(bytes)``; for large inputs, hashed as they are read).
KeyPart = str | bytes | Callable[[Any], None]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_FILES = ("config.json", "adapter_config.json")
_SETTLED_NS = 2_000_000_000  # a file this much older than its hashing has its digest remembered


def model_identity(spec: ModelSpec, path: str, seed: int, memo: str | Path | None = None) -> str:
    """A string that changes whenever the model's weights (or how they are computed with) change: the
    weight and config files' content for a local folder (and the base model's folder for a LoRA adapter);
    the GGUF file's content for a ``gguf_file`` spec; the size config and seed for ``builtin:tiny``; the id
    and the locally cached revision for a hub model; plus dtype and attention. ``memo``: a JSON file that
    remembers file digests (module docstring), so unchanged files are not read again."""
    h = hashlib.sha256()
    h.update(f"dtype={spec.dtype};attn={spec.attn_implementation}".encode())
    if path == BUILTIN_MODEL:
        h.update(f"builtin;{spec.tiny.model_dump_json()};seed={seed}".encode())
    elif spec.gguf_file and path == spec.path:  # converted from this one file (align.models.gguf.hf_folder)
        source = Path(path).expanduser() / spec.gguf_file
        h.update(f"gguf:{spec.gguf_file}:{file_digest(source, memo)}".encode())
    elif Path(path).is_dir():
        h.update(folder_digest(Path(path), memo).encode())
    else:
        h.update(f"hub:{path}@{_cached_revision(path)}".encode())
    return h.hexdigest()


def folder_digest(folder: Path, memo: str | Path | None = None, depth: int = 0) -> str:
    """SHA-256 over the names and content digests of a model folder's weight and config files (every file
    when none has a weight suffix); a LoRA adapter's local base model folder is included."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    chosen = [p for p in files if p.suffix in _WEIGHT_SUFFIXES or p.name in _CONFIG_FILES]
    h = hashlib.sha256()
    for p in chosen if any(p.suffix in _WEIGHT_SUFFIXES for p in chosen) else files:
        h.update(f"{p.name}:{file_digest(p, memo)};".encode())
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and depth < 4:
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir() and Path(base).resolve() != folder.resolve():
            h.update(f"base:{folder_digest(Path(base), memo, depth + 1)}".encode())
    return h.hexdigest()


def file_digest(path: Path, memo: str | Path | None = None) -> str:
    """SHA-256 of the file's content, from ``memo`` while the file's stat is the one it was hashed at."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    key, known = str(path.resolve()), _read_memo(memo)
    if key in known and known[key]["stat"] == stamp:
        return known[key]["sha256"]
    started = time.time_ns()
    digest = sha256_file(path)
    after = path.stat()
    settled = started - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS
    if memo is not None and settled and [after.st_size, after.st_mtime_ns, after.st_ctime_ns] == stamp[:3]:
        _write_memo(Path(memo), {**_read_memo(memo), key: {"stat": stamp, "sha256": digest}})
    return digest


def _read_memo(memo: str | Path | None) -> dict:
    try:
        return json.loads(Path(memo).read_text()) if memo is not None else {}
    except (OSError, ValueError):  # absent, or being replaced: hash again
        return {}


def _write_memo(memo: Path, entries: dict) -> None:
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=memo.name, suffix=".tmp")  # one per writer
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, memo)  # atomic: a reader sees the old or the new file whole


def _cached_revision(repo_id: str) -> str:
    """The commit of the locally cached snapshot of hub model ``repo_id`` ("" when none is cached)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return ""
    return Path(found).parent.name if isinstance(found, str) else ""


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
