"""A broken model is never saved: a stage whose weights end non-finite (``lr=1e38``: every weight +-inf after
one step, which the loop's check before each update cannot see) or that diverged by ``train.divergence``
(``lr=1e3``: weights in the thousands, the loss flat, a reward model stuck at exactly ln 2) stops with one
clear error naming the stage, the steps, the learning rate and what to change; no ``model/``, no
``result.json``, exit code 2. A normal run still saves, and the rules are the user's to set or switch off."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from align.config.recipe import recipe_from_dict
from align.config.specs import DivergenceConfig, TrainConfig
from align.runner import run_recipe
from align.runtime import StageFailed
from align.train.final_checks import BrokenModel, check_trained, loss_ends, weight_norm
from align.train.loop import TrainSummary
from tests.conftest import REPO, tiny_sft_recipe
from tests.integration.test_dpo import dpo_stage
from tests.integration.test_reward_model import marker_records, rm_recipe, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(kind: str, tmp_path: Path, **optim) -> dict:
    """A tiny one-stage recipe of ``kind`` (the stage is named like its kind, the RM ``rm``)."""
    if kind == "sft":
        data = tiny_sft_recipe(tmp_path)
    elif kind == "rm":
        data = rm_recipe(tmp_path, write_jsonl(tmp_path / "prefs.jsonl", marker_records(32)))
    else:
        data = {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": [dpo_stage()]}
    data["stages"][0]["train"]["optim"].update(optim)
    return data


def stage_folder(tmp_path: Path, kind: str) -> Path:
    return tmp_path / "runs/t/round_1" / kind


def run(data: dict, overrides=()) -> list[dict]:
    return run_recipe(recipe_from_dict(data, list(overrides)), log=lambda *_: None)


def assert_nothing_saved(folder: Path) -> None:
    assert not (folder / "model").exists(), "a broken model was saved"
    assert not (folder / "result.json").exists(), "the broken stage counts as finished"


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_weights_that_end_non_finite_are_never_saved(kind, tmp_path):
    data = recipe(kind, tmp_path, lr=1e38)
    with pytest.raises(StageFailed) as err:
        run(data, [f"{kind}.train.max_steps=1"])
    message = str(err.value)
    assert "BrokenModel" in message and f"[{kind}] after 1 step(s) at learning rate 1e+38" in message, message
    assert "weights are not finite" in message and "embed_tokens.weight is the first" in message, message
    assert "lower train.optim.lr" in message
    assert_nothing_saved(stage_folder(tmp_path, kind))


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_a_blown_up_model_with_a_finite_loss_is_never_saved(kind, tmp_path):
    with pytest.raises(StageFailed) as err:
        run(recipe(kind, tmp_path, lr=1e3))
    message = str(err.value)
    assert f"[{kind}] after" in message and "at learning rate 1e+03" in message, message
    assert "train.divergence.max_weight_growth=10" in message and "lower train.optim.lr" in message, message
    assert_nothing_saved(stage_folder(tmp_path, kind))


def test_the_command_line_exits_2_with_one_line_and_saves_nothing(tmp_path):
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(recipe("sft", tmp_path)))
    done = subprocess.run([str(REPO / ".venv/bin/align"), "run", str(recipe_file), "sft.train.optim.lr=1e38",
                           "sft.train.max_steps=1"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights are not finite" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert_nothing_saved(stage_folder(tmp_path, "sft"))


def test_a_normal_run_saves_and_reports_how_much_its_weights_grew(tmp_path):
    (record,) = run(recipe("sft", tmp_path))
    folder = stage_folder(tmp_path, "sft")
    assert (folder / "model/model.safetensors").is_file() and (folder / "result.json").is_file()
    assert 1.0 < record["metrics"]["weight_growth"] < 2.0


def test_the_divergence_rules_are_read_and_can_be_switched_off(tmp_path):
    # off: the blown-up model (lr=1e3) is saved, as it was before the rules existed
    (record,) = run(recipe("sft", tmp_path / "off", lr=1e3), ["sft.train.divergence=null"])
    assert (stage_folder(tmp_path / "off", "sft") / "model").is_dir()
    assert record["metrics"]["weight_growth"] > 1000
    # lr=1: the loss climbs 5.6 -> 21 over 6 steps: the loss rule alone stops it, and nothing stops it without
    data = recipe("sft", tmp_path / "loss", lr=1.0)
    with pytest.raises(StageFailed, match=r"training loss rose from .* \(mean of the first 3 steps\) to .*"
                                          r"max_loss_rise=0.5 allows"):
        run(data, ["sft.train.divergence.max_weight_growth=null"])
    assert_nothing_saved(stage_folder(tmp_path / "loss", "sft"))
    run(data, ["sft.train.divergence.max_weight_growth=null", "sft.train.divergence.max_loss_rise=null"])
    assert (stage_folder(tmp_path / "loss", "sft") / "model").is_dir()


# -- the rules themselves, on a stand-in model -----------------------------------------------------------


class OneProcess:
    num_processes = 1

    @staticmethod
    def unwrap_model(model):
        return model


def summary(losses: list[float]) -> TrainSummary:
    return TrainSummary(steps=len(losses), resumed_from=0, first=None, last=None, tokens=0, seconds=0.0,
                        early=losses[:5], late=losses[-5:])


def check(model, losses, start_norm, loss_falls=True, **rules):
    cfg = TrainConfig(divergence=DivergenceConfig(**rules))
    return check_trained(OneProcess(), model, summary(losses), cfg, stage="s", start_norm=start_norm,
                         loss_falls=loss_falls)


def test_loss_ends_compare_up_to_five_steps_and_never_overlap():
    assert loss_ends(summary([3.0])) is None  # one step: nothing to compare
    assert loss_ends(summary([1.0, 2.0, 9.0])) == (1.0, 9.0, 1)
    assert loss_ends(summary([1.0, 1.0, 3.0, 5.0, 7.0, 9.0])) == (5 / 3, 7.0, 3)
    assert loss_ends(summary([2.0] * 5 + [0.0] * 10 + [1.0] * 5)) == (2.0, 1.0, 5)


def test_each_rule_fires_at_its_margin_and_ppo_is_spared_the_loss_rule():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)  # norm 2
    norm = weight_norm(OneProcess(), model)
    assert norm == pytest.approx(2.0)
    assert check(model, [1.0, 1.0, 1.4, 1.4], start_norm=0.5) == pytest.approx(4.0)  # +40% loss, 4x: passes
    with pytest.raises(BrokenModel, match="grew 4x, more than train.divergence.max_weight_growth=3"):
        check(model, [1.0, 1.0], start_norm=0.5, max_weight_growth=3.0)
    with pytest.raises(BrokenModel, match=r"rose from 1 .* to 1.6 .*max_loss_rise=0.5"):
        check(model, [1.0, 1.0, 1.6, 1.6], start_norm=2.0)
    assert check(model, [1.0, 1.0, 1.6, 1.6], start_norm=2.0, loss_falls=False) == pytest.approx(1.0)
    with torch.no_grad():
        model.weight[1, 0] = float("nan")
    with pytest.raises(BrokenModel, match=r"\[s\] after 2 step\(s\) at learning rate 2e-05: the trained weights "
                                          r"are not finite \(weight is the first"):
        check(model, [1.0, 1.0], start_norm=2.0, max_weight_growth=None, max_loss_rise=None)


@pytest.mark.slow
def test_two_processes_stop_together_and_save_nothing(tmp_path):
    """Each process checks its own weights; the decision is summed over both, so neither waits on the other.
    (Under torchrun the stage's exit code is the launcher's, 1, and its failure report follows the errors.)"""
    from tests.invariants.test_two_processes import child_env

    data = recipe("sft", tmp_path)
    data["stages"][0]["launch"] = {"num_processes": 2}
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(data))
    done = subprocess.run([str(REPO / ".venv/bin/align"), "run", str(recipe_file), "sft.train.optim.lr=1e38",
                           "sft.train.max_steps=1"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=child_env())
    assert done.returncode != 0, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "weights are not finite" in line]
    # one line per process that got to print it: when one exits first, torchrun may stop the other before it does
    assert 1 <= len(errors) <= 2 and all("lm.model.embed_tokens.weight is the first" in e for e in errors), errors
    assert "align/train/" not in done.stderr  # no traceback from the stage (torchrun prints its own)
    assert_nothing_saved(stage_folder(tmp_path, "sft"))
