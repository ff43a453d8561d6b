"""What is inside the files a recipe names, checked before any work starts (no torch, well under a second
for the shared data): every row of every data file against its schema, and every local model folder
(config, weights that are complete, a tokenizer, LoRA targets that exist in the model).

Each function returns problems, one line each, naming the place in the recipe and the file (and the line
and field where there is one).
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

from data_schemas import DataError, read_jsonl

# the modules of the built-in tiny Llama (transformers' LlamaForCausalLM), for LoRA targets
TINY_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "embed_tokens", "lm_head", "score"})
HUB_ID = re.compile(r"^[A-Za-z0-9][\w\-.]*(/[\w\-.]+)?$")


def check_data_file(where: str, path: str, kind: str, skip_bad: bool) -> list[str]:
    """Every row of ``path`` as a ``kind`` record ('sft', 'preference', 'prompt'). A file is read once per
    process for each kind while its size and modification time stay the same (a recipe often names one file
    in several stages)."""
    stat = Path(path).stat()
    problem = _file_problem(str(Path(path).resolve()), path, kind, skip_bad, stat.st_size, stat.st_mtime_ns)
    return [f"{where}: {problem}"] if problem else []


@functools.lru_cache(maxsize=256)
def _file_problem(resolved: str, path: str, kind: str, skip_bad: bool, size: int, mtime_ns: int) -> str | None:
    try:
        rows = read_jsonl(path, kind, skip_bad=skip_bad)
    except DataError as err:
        return str(err)
    if not rows:
        why = f"all {rows.skipped} rows are bad (first: {rows.errors[0]})" if rows.skipped else "it is empty"
        return f"{path} has no {kind} records: {why}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when it is): the header must parse and the
    file must hold every byte the header points to (a truncated copy fails here, not hours later)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return "damaged header (length field out of range)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"truncated: {size} bytes, the header describes {need}"
    return None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def module_names(folder: Path) -> set[str]:
    """The module names (last component, e.g. 'q_proj') of the weights in a safetensors folder."""
    names: set[str] = set()
    for shard in weight_files(folder):
        if not shard.is_file() or safetensors_problem(shard):
            continue
        with shard.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key in header:
            parts = key.split(".")
            if len(parts) >= 2:
                names.add(parts[-2])
    return names


def check_model_folder(where: str, folder: Path, has_tokenizer: bool, lora) -> list[str]:
    """A local HF model folder: ``config.json``, complete weights, a tokenizer (unless the spec names one)
    and, with LoRA, target modules that exist in it."""
    if not folder.is_dir():
        return [f"{where}: {folder} is a file, not a model folder"]
    problems = []
    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError:
        problems.append(f"{where}: {folder} has no config.json (not a Hugging Face model folder)")
    except OSError as err:
        problems.append(f"{where}: {config}: cannot read ({err.strerror or err})")
    except ValueError as err:
        problems.append(f"{where}: {config}: not valid JSON ({err})")
    shards = weight_files(folder)
    if not shards and not any(folder.glob("pytorch_model*.bin")):
        problems.append(f"{where}: {folder} has no weights (*.safetensors)")
    for shard in shards:
        if not shard.is_file():
            problems.append(f"{where}: {shard}: missing (listed in model.safetensors.index.json)")
        elif (why := safetensors_problem(shard)) is not None:
            problems.append(f"{where}: {shard}: {why}")
    if not has_tokenizer and not any((folder / f).is_file() for f in
                                     ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        problems.append(f"{where}: {folder} has no tokenizer (tokenizer.json); set tokenizer: to one")
    if lora is not None and not problems:
        problems += check_lora_targets(f"{where.rsplit('.', 1)[0]}.lora.target_modules", lora.target_modules,
                                       module_names(folder), str(folder))
    return problems


def check_lora_targets(where: str, targets, modules: set[str], model: str) -> list[str]:
    if targets == "all-linear" or not modules:
        return []
    missing = [t for t in targets if t not in modules]
    if not missing:
        return []
    return [f"{where}: {', '.join(repr(t) for t in missing)} match no module of {model}; "
            f"it has: {', '.join(sorted(modules))}"]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what scripts/fetch_smollm2.py --gguf puts in the cache


def check_gguf(where: str, path: str, gguf_file: str) -> list[str]:
    """A GGUF file that exists, starts with the GGUF magic, a ``gguf`` package, and a file it can read."""
    import importlib.util

    file = Path(path).expanduser() / gguf_file
    if not file.is_file():
        hint = " (fetch it with: python scripts/fetch_smollm2.py --gguf)" if gguf_file == SMOLLM2_GGUF else ""
        return [f"{where}.gguf_file: no such file: {file}{hint}"]
    try:
        with file.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        return [f"{where}.gguf_file: {file}: cannot read ({err.strerror or err})"]
    if magic != b"GGUF":
        return [f"{where}.gguf_file: {file} is not a GGUF file (no GGUF magic)"]
    if importlib.util.find_spec("gguf") is None:
        return [f"{where}.gguf_file: reading GGUF needs the gguf package: pip install 'align[gguf]'"]
    st = file.stat()
    why = gguf_problem(str(file.resolve()), st.st_size, st.st_mtime_ns)
    return [f"{where}.gguf_file: {file}: {why}"] if why else []


@functools.cache
def gguf_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why the gguf package cannot read ``path`` (None: it can), read as the conversion will read it:
    a file cut short or garbage after the magic fails here, not in the stage. About 2 s for a 100 MB
    model (its vocabulary), so once per file version (``size``, ``mtime_ns``) and process."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 (the reader raises whatever a damaged file leads it to)
        return f"damaged or not a GGUF model: the gguf package cannot read it ({type(err).__name__}: {err})"
    if not reader.tensors:
        return "holds no tensors (not a GGUF model)"
    return None


def check_model_path(where: str, path: str, has_tokenizer: bool, lora) -> list[str]:
    """A model ``path``: a local folder (checked) or a hub id; anything else that does not exist is an
    error (before this, a missing folder surfaced as the hub's 'Repo id must be in the form ...')."""
    local = Path(path).expanduser()
    if local.exists():
        return check_model_folder(where, local, has_tokenizer, lora)
    if path.startswith(("/", ".", "~")) or not HUB_ID.match(path):
        return [f"{where}: no such folder: {path}"]
    return []  # a hub id: fetched (or found in the hub cache) when the stage loads it
