"""The runner runs every stage in a process of its own: no global state leaks from one stage into the
next, a stage's error reaches the caller with its message, and a stage must write what its kind declares."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align.config.recipe import recipe_from_dict
from align.config.registry import STAGE_BY_KIND
from align.runner import STAGE_MODULES, run_recipe, stage_module
from align.runtime import StageFailed
from tests.conftest import tiny_sft_recipe


def test_every_stage_kind_has_a_module_with_run_and_the_fork_server_preloads_them():
    modules = {kind: stage_module(kind) for kind in STAGE_BY_KIND}
    for kind, module in modules.items():
        assert callable(module.run), kind
    assert sorted(m.__name__ for m in modules.values()) == sorted(STAGE_MODULES)
    assert len(set(STAGE_MODULES)) == len(STAGE_MODULES)
    with pytest.raises(KeyError, match="no module runs stage kind 'nope'"):
        stage_module("nope")


def test_a_bf16_stage_after_an_fp32_stage_and_the_runner_imports_no_torch(tmp_path):
    # in one process this failed: "AcceleratorState has already been initialized and cannot be changed"
    data = tiny_sft_recipe(tmp_path, max_steps=2)
    first = data["stages"][0]
    data["stages"].append({**first, "name": "sft_bf16", "model": {"from": "sft"},
                           "train": {**first["train"], "mixed_precision": "bf16"}})
    code = (
        "import json, sys\n"
        "from align.config.recipe import recipe_from_dict\n"
        "from align.runner import run_recipe\n"
        "records = run_recipe(recipe_from_dict(json.loads(sys.argv[1])), log=lambda *_: None)\n"
        "assert 'torch' not in sys.modules, 'the runner imported torch'\n"
        "print(json.dumps(records))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(data)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["stage"] for r in records] == ["sft", "sft_bf16"]
    assert all(r["metrics"]["steps"] == 2 for r in records)
    assert records[1]["metrics"]["train_loss_first"] != records[0]["metrics"]["train_loss_first"]
    # every stage's metrics are floats in result.json (SFT's step and token counts were ints)
    assert all(type(v) is float for r in records for v in r["metrics"].values())
    assert records[1]["artifacts"] == {"policy": str(tmp_path / "runs/t/round_1/sft_bf16/model")}


def test_a_bad_row_found_by_a_stage_is_reported_with_file_line_and_field(tmp_path):
    bad = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n")
    data = tiny_sft_recipe(tmp_path)
    data["stages"][0]["data"] = {"paths": [str(bad)]}
    recipe = recipe_from_dict(data)  # valid when checked; the file then changes under the run
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(StageFailed) as err:
        run_recipe(recipe, log=lambda *_: None)
    assert err.value.user_error and err.value.stage == "sft"
    assert f"{bad}:1: field 'messages'" in str(err.value)
    assert not (tmp_path / "runs" / "t" / "round_1" / "sft" / "result.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_run_leaves_no_stage_training(tmp_path, processes):
    import signal
    import time

    import yaml

    data = tiny_sft_recipe(tmp_path, max_steps=100000, log_every=1)
    data["stages"][0]["launch"] = {"num_processes": processes}  # 2: under torchrun
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    runner = subprocess.Popen([sys.executable, "-m", "align.cli", "run", str(recipe_file)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs/t/round_1/sft/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert runner.poll() is None and time.monotonic() < deadline, "the stage never started training"
        time.sleep(0.05)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    time.sleep(0.5 if processes == 1 else 5.0)  # milliseconds; torchrun takes a few seconds to stop its workers
    rows = len(metrics.read_text().splitlines())
    time.sleep(2.0)
    assert len(metrics.read_text().splitlines()) == rows, "the stage kept training after its runner died"


def test_a_diverging_stage_stops_with_the_step_and_saves_nothing(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=6, log_every=1)
    data["stages"][0]["train"]["optim"] = {"lr": 1.0e30, "warmup_ratio": 0.0, "max_grad_norm": None}
    with pytest.raises(StageFailed) as err:
        run_recipe(recipe_from_dict(data), log=lambda *_: None)
    message = str(err.value)
    assert err.value.user_error and "training diverged" in message and "lower train.optim.lr" in message
    assert "step " in message and "/6" in message
    stage = tmp_path / "runs/t/round_1/sft"
    assert not (stage / "result.json").exists() and not (stage / "model").exists()
    for line in (stage / "metrics.jsonl").read_text().splitlines():  # still JSON: no bare NaN/Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))


def test_inf_and_nan_settings_are_rejected_at_validation(tmp_path):
    from align.config.recipe import RecipeError

    for value in (".inf", ".nan"):
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(tiny_sft_recipe(tmp_path), [f"sft.train.optim.lr={value}"])
        assert err.value.problems[0].startswith("stages[sft].train.optim.lr: Input should be a finite number")


def test_a_moved_run_folder_reads_its_own_artifacts(tmp_path):
    import shutil

    data = tiny_sft_recipe(tmp_path, max_steps=1)
    first = data["stages"][0]
    data["stages"].append({**first, "name": "sft2", "model": {"from": "sft"}})
    run_recipe(recipe_from_dict(data), log=lambda *_: None)
    result = json.loads((tmp_path / "runs/t/round_1/sft/result.json").read_text())
    assert result["artifacts"] == {"policy": "round_1/sft/model"}  # relative to the run folder
    shutil.move(tmp_path / "runs", tmp_path / "moved")  # the old location is gone
    data["output_dir"] = str(tmp_path / "moved")
    data["stages"][1]["train"] = {**first["train"], "max_steps": 2}  # sft2 changed: it reruns, sft does not
    records = run_recipe(recipe_from_dict(data), log=lambda *_: None)
    assert [r["skipped"] for r in records] == [True, False]
    assert records[0]["artifacts"]["policy"] == str(tmp_path / "moved/t/round_1/sft/model")
    assert records[1]["metrics"]["steps"] == 2


def test_more_accumulation_than_data_is_a_clear_input_error(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=2, grad_accum=500)
    with pytest.raises(StageFailed) as err:
        run_recipe(recipe_from_dict(data), log=lambda *_: None)
    assert err.value.user_error  # exit code 2, one line, no traceback
    assert "one optimizer step needs 500 micro-batches" in str(err.value) and "lower batch_size or grad_accum" in str(err.value)
