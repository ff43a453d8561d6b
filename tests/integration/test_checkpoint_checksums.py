"""A flipped bit in what align wrote is found before it is used (sizes and headers stay intact, so only the
content's SHA-256 tells):

- in the newest training checkpoint (weights, optimizer or RNG state, or a number in ``loop_state.json``):
  the resume passes it over with a warning naming the file and ends with exactly the weights of a run that
  was never interrupted; a lone damaged checkpoint is passed over the same way and the run starts over;
- in a finished stage's ``model/``: the next stage that loads it stops with an input error (exit code 2)
  naming the file; a folder without a manifest (a user's own model) loads as before.

The killed SFT run (checkpoints at steps 2 and 4) and its helpers are those of test_checkpoint_safety.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from align.checksums import MANIFEST, DamagedModelError, verify_model_folder
from align.config.recipe import recipe_from_dict
from align.runner import run_recipe
from align.runtime import StageFailed, StageInputError
from tests.conftest import tiny_sft_recipe
from tests.integration import test_checkpoint_safety as safety
from tests.integration.test_checkpoint_safety import checkpoint, rerun

pytestmark = pytest.mark.usefixtures("one_thread")
killed, copy, reference = safety.killed, safety.copy, safety.reference  # the fixtures (copy needs killed)


def flip_middle_byte(path: Path) -> None:
    """Invert one byte in the middle of the file: same size; for safetensors, inside the tensor data
    (after the header, which stays readable)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    data[start + (len(data) - start) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_older_one(copy, capsys, reference, name):
    newest = checkpoint(copy, 4)
    size = (newest / name).stat().st_size
    flip_middle_byte(newest / name)
    assert (newest / name).stat().st_size == size
    if name == "model.safetensors":  # the header is intact: only the content tells
        with safe_open(str(newest / name), "pt") as f:
            assert "lm.model.norm.weight" in f.keys()  # noqa: SIM118 - not a dict
    messages = rerun(copy, capsys, "step_0000002", reference)
    assert str(newest) in messages and f"{name} does not match its SHA-256 checksum" in messages, messages


def test_a_changed_number_in_loop_state_falls_back_to_the_older_one(copy, capsys, reference):
    newest = checkpoint(copy, 4)
    state = json.loads((newest / "loop_state.json").read_text())
    state["tokens"] += 1  # still valid JSON with a step and a key
    (newest / "loop_state.json").write_text(json.dumps(state))
    messages = rerun(copy, capsys, "step_0000002", reference)
    assert "loop_state.json does not match its checksum" in messages, messages


def test_a_lone_damaged_checkpoint_is_passed_over_and_the_run_starts_over(copy, capsys, reference):
    shutil.rmtree(checkpoint(copy, 2))
    flip_middle_byte(checkpoint(copy, 4) / "model.safetensors")
    messages = rerun(copy, capsys, None, reference)  # like every other damaged lone checkpoint
    assert "model.safetensors does not match its SHA-256 checksum" in messages, messages


def test_a_flipped_byte_in_a_finished_stages_model_stops_the_next_stage(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=1)
    run_recipe(recipe_from_dict(data), log=lambda *_: None)
    model = tmp_path / "runs/t/round_1/sft/model"
    manifest = json.loads((model / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(manifest)
    verify_model_folder(model)  # as written: fine
    flip_middle_byte(model / "model.safetensors")
    data["stages"].append({**data["stages"][0], "name": "sft2", "model": {"from": "sft"}})
    with pytest.raises(StageFailed) as err:
        run_recipe(recipe_from_dict(data), log=lambda *_: None)  # sft is up to date; sft2 loads its model
    assert err.value.user_error  # exit code 2, one line
    assert "model.safetensors does not match its SHA-256 checksum" in str(err.value), err.value
    assert str(model) in str(err.value)


def test_model_folders_are_verified_before_loading_and_ones_without_a_manifest_load_as_before(tmp_path):
    from align.config.specs import ModelSpec
    from align.models.loading import load_causal_lm, load_tokenizer, save_checkpoint
    from align.models.reward import load_reward_model
    from align.stages.model_average import average_checkpoints

    spec = ModelSpec(path="builtin:tiny", tiny={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1})
    tokenizer = load_tokenizer(spec, "builtin:tiny")
    lm = load_causal_lm(spec, "builtin:tiny", tokenizer)
    folder = save_checkpoint(lm, tokenizer, tmp_path / "model")
    plain = ModelSpec(path=str(folder))
    average_checkpoints([folder, folder], [0.5, 0.5], tmp_path / "avg")  # its own manifest, not a copy
    for path in (folder, tmp_path / "avg"):
        load_causal_lm(plain, str(path), load_tokenizer(plain, str(path)))
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(DamagedModelError, match="tokenizer_config.json has .* bytes"):
        load_tokenizer(plain, str(folder))
    shutil.copy2(tmp_path / "avg" / "tokenizer_config.json", folder / "tokenizer_config.json")
    flip_middle_byte(folder / "model.safetensors")
    for load in (lambda: load_causal_lm(plain, str(folder), tokenizer),
                 lambda: load_reward_model(plain, str(folder), tokenizer),
                 lambda: average_checkpoints([folder, tmp_path / "avg"], [0.5, 0.5], tmp_path / "avg2")):
        with pytest.raises(StageInputError, match="model.safetensors does not match its SHA-256 checksum"):
            load()
    (folder / MANIFEST).unlink()  # a folder without a manifest (a user's own model): loaded as it is
    load_causal_lm(plain, str(folder), load_tokenizer(plain, str(folder)))
