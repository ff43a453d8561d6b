"""The accelerate configs in recipes/accelerate/: each is a valid accelerate config a stage can name, and
the DDP one (on CPU) trains SFT, the reward model and DPO through `accelerate launch` exactly like one
process with twice the gradient accumulation. ZeRO and FSDP need GPUs: see docs/scaling.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align.config.recipe import recipe_from_dict
from tests.invariants.test_two_processes_dpo_rm import stage

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates_in_a_recipe(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type.value in {"MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP"}
    recipe = recipe_from_dict({"name": "t", "stages": [
        {**stage("dpo", 2, 1), "launch": {"num_processes": 2, "accelerate_config": str(config)}}]})
    assert recipe.stages[0].launch.accelerate_config == str(config)
    assert yaml.safe_load(config.read_text())["num_machines"] == 1


@pytest.mark.slow
def test_a_launcher_that_starts_fewer_processes_stops_the_stage(tmp_path):
    """accelerate runs a CPU config (MULTI_CPU, use_cpu) as ONE process unless MPI is set up: the stage
    would train alone, with half the batch, and say nothing. It must stop with a clear message instead."""

    from tests.invariants.test_two_processes_dpo_rm import child_env

    config = tmp_path / "cpu.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                                      "mixed_precision": "no", "num_machines": 1, "num_processes": 2,
                                      "use_cpu": True}))
    data = {"name": "t", "stages": [{**stage("dpo", 2, 1),
                                     "launch": {"num_processes": 2, "accelerate_config": str(config)}}]}
    from align.config.recipe import RecipeError

    with pytest.raises(RecipeError, match="is a CPU config, which accelerate runs as ONE process"):
        recipe_from_dict(data)  # refused before any work
    # and if it is run anyway (a recipe checked elsewhere), the stage's processes refuse to train alone
    resolved = recipe_from_dict({**data, "stages": [{**data["stages"][0], "launch": {"num_processes": 2}}]})
    resolved.stages[0].launch.accelerate_config = str(config)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    from align.config.recipe import dump_recipe

    (tmp_path / "resolved.yaml").write_text(dump_recipe(resolved))
    from align.runner import _launch_children

    out = tmp_path / "runs/t/round_1/dpo"
    out.mkdir(parents=True)
    resolved_file = tmp_path / "resolved.yaml"
    import os

    old = dict(os.environ)
    os.environ.update(child_env())
    try:
        from align.runtime import StageFailed

        with pytest.raises(StageFailed):
            _launch_children(resolved_file, resolved.stages[0], 1, "fp", out)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert not (out / "result.json").exists()
