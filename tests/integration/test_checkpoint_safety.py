"""Checkpoints are safe to resume and robust to damage (SFT on a tiny model, killed after its step-4
checkpoint, with checkpoints at steps 2 and 4 left behind):

- a pickle planted in a checkpoint folder, under any name accelerate reads, never runs: the checkpoint
  is passed over with a warning and the older one is used;
- a damaged newest checkpoint (loop state or weights cut short, a corrupt optimizer record) is passed
  over for the older one; with none usable the run starts from scratch, its model untouched by the
  damaged files;

and every rerun ends with exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import align.train.loop as loop
from align.config.base import Artifact
from align.config.recipe import recipe_from_dict
from align.runner import run_stage
from align.train.checkpoints import CheckpointWarning
from tests.conftest import tiny_sft_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"max_steps": 6, "save_every": 2}  # checkpoints at steps 2 and 4 (keep_checkpoints: 2)


class Planted:
    """Unpickled with ``weights_only=False``, it makes the directory ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def stage_dir(root: Path) -> Path:
    return root / "runs" / "t" / "round_1" / "sft"


def run(root: Path):
    return run_stage(recipe_from_dict(tiny_sft_recipe(root, **SETTINGS)), "sft", 1, "fp")


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.artifacts[Artifact.POLICY]) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a run that was never interrupted."""
    return weights(run(tmp_path_factory.mktemp("clean")))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed during step 6, after its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("killed")
    real, calls = loop.optimizer_step, []

    def killed_at_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    loop.optimizer_step = killed_at_sixth
    try:
        with pytest.raises(KeyboardInterrupt):
            run(root)
    finally:
        loop.optimizer_step = real
    steps = sorted(p.name for p in (stage_dir(root) / "checkpoints").glob("step_*"))
    assert steps == ["step_0000002", "step_0000004"]
    return root


@pytest.fixture
def copy(killed, tmp_path) -> Path:
    """A fresh copy of the killed run to damage."""
    shutil.copytree(killed / "runs", tmp_path / "runs")
    return tmp_path


def rerun(root: Path, capsys, resumed_from: str | None, reference, passed_over: bool = True) -> str:
    """Run again: resumes from ``resumed_from`` (None: from scratch), warns that a checkpoint was passed
    over (or not), and ends with ``reference``'s weights. -> the warnings."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as every:
        warnings.simplefilter("always")
        result = run(root)
    out = capsys.readouterr().out
    caught = [w for w in every if issubclass(w.category, CheckpointWarning)]
    assert bool(caught) == passed_over, [str(w.message) for w in caught]
    if resumed_from is None:
        assert "resuming" not in out
        assert any("starting from scratch" in str(w.message) for w in caught)
    else:
        assert f"resuming from {resumed_from} " in out, out
    final = weights(result)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name
    return "\n".join(str(w.message) for w in caught)


def checkpoint(root: Path, step: int) -> Path:
    return stage_dir(root) / "checkpoints" / f"step_{step:07d}"


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin",
                                  "pytorch_model.bin"])
def test_a_planted_pickle_never_runs(copy, capsys, reference, name):
    marker = copy / "pwned"
    newest = checkpoint(copy, 4)
    if name == "pytorch_model.bin":  # read when there is no model.safetensors
        (newest / "model.safetensors").unlink()
    torch.save(Planted(marker), newest / name)
    try:
        messages = rerun(copy, capsys, "step_0000002", reference)
    finally:
        assert not marker.exists(), f"{name} was unpickled with weights_only=False"
    assert str(newest) in messages and (name in messages or "model.safetensors" in messages), messages


def test_planted_pickles_in_every_checkpoint_start_over(copy, capsys, reference):
    marker = copy / "pwned"
    for step in (2, 4):
        torch.save(Planted(marker), checkpoint(copy, step) / "custom_checkpoint_0.pkl")
    try:
        rerun(copy, capsys, None, reference)
    finally:
        assert not marker.exists(), "custom_checkpoint_0.pkl was unpickled with weights_only=False"


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_tensor_byte(path: Path) -> None:
    """Change one byte of the optimizer's last tensor record (the zip's CRC no longer matches)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = [i for i in z.infolist() if "/data/" in i.filename][-1]
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # the record's data follows its local header
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["loop_state.json", "model.safetensors", "optimizer.bin", "optimizer.bin crc",
                                    "random_states_0.pkl"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(copy, capsys, reference, damage):
    newest = checkpoint(copy, 4)
    if damage.endswith(" crc"):
        flip_last_tensor_byte(newest / damage.split()[0])
    else:
        cut_in_half(newest / damage)
    messages = rerun(copy, capsys, "step_0000002", reference)
    assert str(newest) in messages and damage.split()[0] in messages, messages


def test_no_usable_checkpoint_starts_from_scratch_with_the_model_untouched(copy, capsys, reference):
    cut_in_half(checkpoint(copy, 4) / "loop_state.json")
    # the older one's weights are whole but its optimizer state is cut short: loading it would overwrite
    # the model, then fail; it is found damaged first, so the fresh model stays as it was
    cut_in_half(checkpoint(copy, 2) / "optimizer.bin")
    rerun(copy, capsys, None, reference)


def test_metrics_lines_cut_short_by_the_kill_are_dropped_on_resume(copy, capsys, reference):
    metrics = stage_dir(copy) / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 6, "train/lo')  # killed while logging step 6
    rerun(copy, capsys, "step_0000004", reference, passed_over=False)
    from align.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(stage_dir(copy)) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
