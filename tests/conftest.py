"""Shared fixtures: tiny models and data, and where ../shared/data is (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread (several times faster on a loaded machine).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


def tiny_sft_recipe(tmp_path: Path, **train) -> dict:
    """A recipe dict with one SFT stage on a tiny model and the built-in chat data."""
    return {
        "name": "t",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "stages": [{
            "name": "sft",
            "kind": "sft",
            "model": {"path": "builtin:tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                                       "num_hidden_layers": 2, "num_attention_heads": 2,
                                                       "num_key_value_heads": 1}},
            "data": {"builtin": "chat", "builtin_size": 64, "eval_fraction": 0.1},
            "train": {"batch_size": 4, "max_length": 96, "max_steps": 6, "report_to": [],
                      "optim": {"lr": 3e-3, "warmup_ratio": 0.0}, **train},
        }],
    }


class GradRecorder:
    """Optimizer stand-in: ``step()`` keeps a copy of every trainable parameter's gradient (zeros where
    there is none), nothing is updated."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.grads = None

    def step(self):
        import torch

        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


class ConstantLR:
    """Scheduler stand-in."""

    def get_last_lr(self):
        return [0.0]

    def step(self):
        pass


def fixed_logps_module(values):
    """A module standing in for ``TokenLogps``: returns ``values`` (the per-token log-probs) whatever the
    input."""
    from torch import nn

    class FixedLogps(nn.Module):
        def __init__(self):
            super().__init__()
            self.values = values

        def forward(self, *inputs):
            return self.values

    return FixedLogps()


def run_in_one_process(data: dict, output_dir: Path) -> list[dict]:
    """``align run`` of a one-process recipe, from this (test) process: its stages get their own processes
    from the runner's warm fork server, one intra-op thread each (as ``OMP_NUM_THREADS=1`` would give),
    without paying a CLI start and a fork server of their own."""
    import torch

    from align.config.recipe import recipe_from_dict
    from align.runner import run_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_recipe(recipe_from_dict({**data, "output_dir": str(output_dir)}), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


def load_recipe_or_skip(path):
    """A recipe of ``recipes/``; skipped when it reads ../shared/data and that is absent (validation checks
    that every data file exists)."""
    from align.config.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as err:
        missing_shared = [p for p in err.problems if "file not found" in p and "shared/data" in p]
        missing_smollm2 = [p for p in err.problems if "fetch_smollm2.py --gguf" in p]
        if len(missing_shared) + len(missing_smollm2) == len(err.problems):
            if missing_shared and not SHARED_DATA.is_dir():
                pytest.skip(f"{Path(path).name} reads {SHARED_DATA}, which is not present")
            if missing_shared == []:
                pytest.skip(f"{Path(path).name} needs SmolLM2 (python scripts/fetch_smollm2.py --gguf): "
                            "validated in tests/integration/test_smollm2.py once fetched")
        raise
