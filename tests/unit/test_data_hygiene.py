"""Nothing silently accepted: max_steps past the stated epochs is reported, a data file listed twice is an
error naming the field (the per-stage data counts are in test_dpo_data, test_reward_data and the stage
tests)."""

import pytest
import yaml

from align.config.recipe import RecipeError, load_recipe
from align.config.specs import DataSpec, TrainConfig
from align.train.common import plan_epochs
from align.train.loop import make_plan


def groups(n_micro):
    return lambda epoch: [[i] for i in range(n_micro)]


@pytest.mark.parametrize("epochs,max_steps,steps,trained", [
    (1.0, None, 30, 1.0), (2.0, None, 60, 2.0), (1.0, 30, 30, 1.0), (1.0, 120, 120, 4.0), (3.0, 15, 15, 0.5),
])
def test_epochs_trained_follows_the_plan(epochs, max_steps, steps, trained):
    cfg = TrainConfig(epochs=epochs, max_steps=max_steps)
    plan = make_plan(groups(60), cfg.epochs, 2, cfg.max_steps)  # 60 micro-batches, 2 a step: 30 steps an epoch
    assert len(plan) == steps
    got, note = plan_epochs(cfg, len(plan), 60, 2)
    assert got == pytest.approx(trained)
    assert (note is None) == (max_steps is None or max_steps == 30 * epochs)


def test_max_steps_past_the_epochs_is_said():
    _, note = plan_epochs(TrainConfig(max_steps=500), 500, 120, 1)
    assert note == "max_steps=500 > 1 epoch = 120 steps: training 4.17 epochs (max_steps overrides epochs)"
    _, note = plan_epochs(TrainConfig(epochs=2, max_steps=60), 60, 120, 1)
    assert note.startswith("max_steps=60 < 2 epochs = 240 steps: training 0.50 epochs")
    assert "overrid" in TrainConfig.model_fields["max_steps"].description  # shown by `align options`


def write_recipe(tmp_path, paths):
    recipe = {"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [{
        "name": "dpo", "kind": "dpo", "model": {"path": "builtin:tiny"}, "data": {"paths": paths}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_data_file_listed_twice_is_an_error_naming_the_field(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    monkeypatch.chdir(tmp_path)
    load_recipe(write_recipe(tmp_path, ["a.jsonl", "b.jsonl"]))
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, ["a.jsonl", "b.jsonl", str(tmp_path / "a.jsonl")]))
    assert err.value.problems == [
        f"stages[dpo].data.paths: lists '{tmp_path / 'a.jsonl'}' twice (as 'a.jsonl' and '{tmp_path / 'a.jsonl'}'); "
        "each file is read once: remove the repeat"
    ]
    with pytest.raises(ValueError, match="lists 'b.jsonl' twice;"):
        DataSpec(paths=["b.jsonl", "b.jsonl"])
