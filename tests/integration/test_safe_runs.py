"""A rerun never destroys a finished result before its replacement is complete; one run per run folder;
no folder align did not make is deleted; names cannot climb out of the run folder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from align.config.recipe import RecipeError, recipe_from_dict
from align.run_folders import settle_swap, work_dir
from align.runner import run_recipe
from align.runtime import StageFailed, StageInputError
from tests.conftest import tiny_sft_recipe


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its content hash (mtimes aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".align.lock" not in p.name}


def quiet(*_):
    pass


def test_a_failing_rerun_with_other_settings_keeps_the_finished_result(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=2)
    run_recipe(recipe_from_dict(data), log=quiet)
    run_dir = tmp_path / "runs/t"
    before = snapshot(run_dir)
    assert "round_1/sft/model/model.safetensors" in before and "report.md" in before

    # the same stage, changed so that it fails part-way (it diverges within 6 steps)
    bad = tiny_sft_recipe(tmp_path, max_steps=6)
    bad["stages"][0]["train"]["optim"] = {"lr": 1.0e30, "warmup_ratio": 0.0, "max_grad_norm": None}
    with pytest.raises(StageFailed, match="training diverged"):
        run_recipe(recipe_from_dict(bad), log=quiet)
    after = {k: v for k, v in snapshot(run_dir).items() if not k.startswith(("round_1/sft.next/",
                                                                             "resolved.running"))}
    assert after == before, "the rerun changed or removed the finished result"
    assert "lr: 1.0e+30" not in (run_dir / "resolved.yaml").read_text()

    # the original settings again: nothing to do; the new ones, fixed: built beside, then swapped in
    logs = []
    records = run_recipe(recipe_from_dict(data), log=logs.append)
    assert records[0]["skipped"] and snapshot(run_dir)["round_1/sft/model/model.safetensors"] == \
        before["round_1/sft/model/model.safetensors"]
    # the failed rebuild of the other settings is cleaned up once the stage is up to date
    assert not (run_dir / "round_1/sft.next").exists() and any("removed sft.next" in line for line in logs)
    other = tiny_sft_recipe(tmp_path, max_steps=3)
    logs.clear()
    records = run_recipe(recipe_from_dict(other), log=logs.append)
    assert any("beside the finished result" in line for line in logs)
    assert records[0]["metrics"]["steps"] == 3
    assert records[0]["artifacts"]["policy"] == str(run_dir / "round_1/sft/model")
    assert json.loads((run_dir / "round_1/sft/result.json").read_text())["artifacts"] == \
        {"policy": "round_1/sft/model"}
    assert not (run_dir / "round_1/sft.next").exists() and not (run_dir / "round_1/sft.old").exists()
    assert snapshot(run_dir)["round_1/sft/model/model.safetensors"] != before["round_1/sft/model/model.safetensors"]


def _finished(folder: Path, fp: str) -> None:
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"fingerprint": fp, "kind": "sft"}))
    (folder / "result.json").write_text(json.dumps({"fingerprint": fp, "artifacts": {}, "metrics": {}}))
    (folder / "weights").write_text(fp)


def test_work_folder_and_every_moment_of_a_swap_a_kill_can_leave(tmp_path):
    out = tmp_path / "round_1" / "sft"
    # nothing there: the stage's own folder; an unfinished build of the same work: resumed in place
    assert work_dir(out, "a", "sft") == out
    (out / "checkpoints").mkdir()
    assert work_dir(out, "a", "sft") == out and (out / "checkpoints").exists()
    # an unfinished build of other work is not a result: cleared
    assert work_dir(out, "b", "sft") == out and not (out / "checkpoints").exists()
    # a finished result of other work: built beside, the result untouched; resumed there after a kill
    (out / "result.json").write_text(json.dumps({"fingerprint": "b"}))
    work = work_dir(out, "c", "sft")
    assert work == out.with_name("sft.next") and (out / "result.json").exists()
    (work / "checkpoints").mkdir()
    assert work_dir(out, "c", "sft") == work and (work / "checkpoints").exists()

    # killed between the two renames of a swap: NAME gone, NAME.old the replaced result, NAME.next done
    for state in ("next_done_only", "old_only", "both_kept"):
        root = tmp_path / state
        target = root / "sft"
        if state == "next_done_only":
            _finished(root / "sft.old", "old")
            _finished(root / "sft.next", "new")
            expected = "new"
        elif state == "old_only":
            _finished(root / "sft.old", "old")
            (root / "sft.next").mkdir()  # incomplete rebuild
            expected = "old"
        else:
            _finished(target, "new")
            _finished(root / "sft.old", "old")
            expected = "new"
        settle_swap(target)
        assert (target / "weights").read_text() == expected
        assert not (root / "sft.old").exists()


def test_a_folder_align_did_not_make_is_never_deleted(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=1)
    foreign = tmp_path / "runs/t/round_1/sft"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(StageInputError, match="align did not make it"):
        run_recipe(recipe_from_dict(data), log=quiet)
    assert (foreign / "thesis.tex").read_text() == "years of work"


HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from align.run_lock import run_folder_lock\n"
    "with run_folder_lock(Path(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_a_second_run_into_the_same_folder_stops_and_a_killed_holder_leaves_no_lock(tmp_path):
    data = tiny_sft_recipe(tmp_path, max_steps=1)
    run_dir = tmp_path / "runs/t"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe_file = tmp_path / "r.json"
        recipe_file.write_text(json.dumps(data))
        done = subprocess.run([sys.executable, "-m", "align.cli", "run", str(recipe_file)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"run folder {run_dir} is in use by process {holder.pid}" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (run_dir / "round_1").exists(), "the second run started work"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    from align.run_lock import run_folder_lock

    with run_folder_lock(run_dir):  # the OS dropped the killed holder's lock
        pass


@pytest.mark.parametrize("override, message", [
    ("name=..", "name"),
    ("name=.hidden", "name"),
    ("output_dir=runs/../../elsewhere", "output_dir"),
])
def test_names_and_output_folders_cannot_climb_out(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_sft_recipe(tmp_path), [override])
    assert err.value.problems[0].startswith(message)
