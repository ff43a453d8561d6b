"""Every module of ``align``, ``rewards``, ``eval`` and ``data_schemas`` imports on its own, as the first
module of its package that a process imports: an import cycle that only bites when one module is imported
before another (``python -c "import align.config.registry"``) fails here.

A fresh interpreter per module would cost about 2 s each (torch); instead a few interpreters each import a
batch of modules, dropping every module of our packages from ``sys.modules`` before each import (third-party
modules such as torch stay loaded, which is what makes it fast and changes nothing about our own cycles)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("align", "rewards", "eval", "data_schemas", "world")
# Optional extras a module may import at its top; a module is skipped only when one of these is missing.
OPTIONAL = frozenset({"vllm", "gguf", "trl", "deepspeed", "bitsandbytes", "flash_attn", "liger_kernel"})
BATCHES = 3

CHILD = r"""
import importlib, json, sys, traceback
OURS = {ours!r}
report = {{}}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in OURS]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        report[name] = ["missing", err.name or "", traceback.format_exc()]
    except BaseException as err:  # noqa: BLE001 (any failure is the finding)
        report[name] = ["error", type(err).__name__, traceback.format_exc()]
print(json.dumps(report))
"""


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                continue  # runs on import
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_each(modules: list[str]) -> dict[str, list[str]]:
    """Module -> [outcome, detail, traceback] for every module that did not import."""
    code = CHILD.format(ours=set(PACKAGES))
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_walk_finds_the_packages():
    found = set(all_modules())
    assert {"align", "align.config.registry", "align.runner", "rewards", "eval", "data_schemas"} <= found
    assert len(found) > 50


@pytest.mark.parametrize("batch", range(BATCHES))
def test_every_module_imports_on_its_own(batch):
    modules = all_modules()[batch::BATCHES]
    failed = import_each(modules)
    broken = {name: tb for name, (outcome, detail, tb) in failed.items()
              if not (outcome == "missing" and detail.split(".")[0] in OPTIONAL)}
    assert not broken, "\n\n".join(f"{name}:\n{tb}" for name, tb in broken.items())


def test_a_cycle_is_caught(tmp_path):
    """The check itself: two modules that import each other by name fail when the first is imported first."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyc.a import A\nB = 2\n")
    code = CHILD.format(ours={"cyc"})
    done = subprocess.run([sys.executable, "-c", code, "cyc.b", "cyc.a"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(failed) == {"cyc.a", "cyc.b"}
    assert failed["cyc.a"][1] == "ImportError"
