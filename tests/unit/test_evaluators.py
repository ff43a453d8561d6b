"""Evaluators (align.evaluators) and plug-ins (align.plugins): names resolve through the plug-ins' tables (the
built-in world's) or a dotted path; an unknown name is one validation error before anything runs; the world
package imports on its own."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align import plugins
from align.cli import main
from align.config.recipe import RecipeError, recipe_from_dict
from align.config.registry import STAGE_BY_KIND
from align.evaluators import evaluate_all, evaluate_samples, evaluate_turns, first_scores, load_evaluators
from world.evaluator import WorldEvaluator
from world.generator import eval_prompt_records, sample_task
from world.retention import combination_text, follow_all, instruction_combinations

REPO = Path(__file__).resolve().parents[2]
ROUND = REPO / "recipes" / "llama3_round.yaml"
USER = "tests.user_evaluators:answer_length"
JUDGE = "tests.user_evaluators:LENGTH_JUDGE"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def problems(overrides) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(yaml.safe_load(ROUND.read_text()), overrides, source="r.yaml")
    return exc.value.problems


def test_world_imports_alone(tmp_path):
    code = ("import sys, world, world.plugin; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'align', 'eval', 'rewards', 'torch'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_world_gives_its_seams_by_name():
    assert plugins.names("evaluator") == ["diversity", "sentiment", "world"]
    assert plugins.names("reward") == ["gold", "sentiment"]
    assert plugins.names("sft") == ["world", "world_chat", "world_dialogues"]
    assert plugins.names("preferences") == ["world", "world_helpful", "world_safety"]
    assert plugins.names("prompts") == ["world", "world_eval"] and plugins.names("tokenizer") == ["world"]
    assert isinstance(load_evaluators(["world"])[0], WorldEvaluator)
    takes = {kind for kind, cls in STAGE_BY_KIND.items() if "evaluators" in cls.model_fields}
    assert takes == {"rejection_sampling", "gatt", "evaluate", "ppo"}


def test_world_evaluator_reports_gold_metrics_on_world_prompts_only():
    prompts = [r.prompt for r in eval_prompt_records(40, 0)]
    [world] = load_evaluators(["world"])
    refusals = evaluate_all([world], prompts, ["I can't help with that."] * len(prompts))
    # refusing everything: no violation, no helpfulness, every look-alike refused
    assert refusals["safety_violation_rate"] == 0.0 and refusals["gold_helpfulness"] == 0.0
    assert refusals["over_refusal_rate"] == 1.0 and refusals["n"] == 40.0
    assert evaluate_all([world], [user("Write me a poem.")], ["No."]) == {}
    assert first_scores([world], [user("Write me a poem.")], ["No."]) is None


def test_a_user_evaluator_by_dotted_path():
    evaluators = load_evaluators([USER, JUDGE])
    prompts = [user("hi"), user("ho")]
    assert evaluate_all(evaluators, prompts, ["ab", "abcd"]) == {"answer_chars": 3.0, "answers": 2.0,
                                                                  "length_mean": 3.0}
    assert first_scores(evaluators, prompts, ["ab", "abcd"]) == [2.0, 4.0]
    with pytest.raises(ValueError, match="two evaluators report the metric 'answer_chars'"):
        evaluate_all([evaluators[0], evaluators[0]], prompts, ["ab", "abcd"])
    with pytest.raises(TypeError, match="not callable"):
        load_evaluators(["tests.user_evaluators:NOT_CALLABLE"])
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        load_evaluators(["tests.user_evaluators:nothing"])


def test_rejection_samples_give_best_sample_and_first_means():
    prompts = [user("a"), user("b"), user("c")]
    samples = [["x", "xxx"], ["xx"], []]  # the third prompt kept nothing
    m = evaluate_samples(load_evaluators([JUDGE, USER]), prompts, samples, ["xxx", "xx", None])
    # scored: kept (3 + 2) / 2, all samples (1 + 3 + 2) / 3, first samples (1 + 2) / 2; unscored: the kept answers
    assert m == {"length_best_mean": 2.5, "length_sample_mean": 2.0, "length_first_mean": 1.5,
                 "answer_chars": 2.5, "answers": 2.0}


def test_turns_use_an_evaluators_turns_else_the_evaluator():
    combo = next(c for c in instruction_combinations() if [i.kind for i in c] == ["upper"])
    task = sample_task(random.Random(0), "train", "helpfulness")
    seen = user(f"{combination_text(combo)} {task.prompt}")
    m = evaluate_turns(load_evaluators(["world", USER]), [seen, seen], [follow_all(combo, task), "no idea"])
    assert m == {"gold_instruction_following": 0.5, "gold_task_accuracy": 0.5,
                 "answer_chars": (len(follow_all(combo, task)) + 7) / 2, "answers": 2.0}


def test_an_unknown_evaluator_is_one_validation_error():
    assert problems(["rs.evaluators=[wrld]"]) == [
        "stages[rs].evaluators: unknown evaluator 'wrld' (did you mean 'world'?); known: diversity, sentiment, world or a dotted "
        "path 'package.module:name'"]
    assert problems(["eval_sft.evaluators=[world, nopkg.judges:judge]"]) == [
        "stages[eval_sft].evaluators: no module 'nopkg.judges' (of 'nopkg.judges:judge') can be imported"]
    assert problems(["annotate.reward={function: gld}"]) == [
        "stages[annotate].reward.function: unknown reward 'gld' (did you mean 'gold'?); known: gold, sentiment or a "
        "dotted path 'package.module:name'"]
    recipe_from_dict(yaml.safe_load(ROUND.read_text()), [f"rs.evaluators=[world, '{USER}']"])


def test_an_unknown_evaluator_stops_the_run_before_any_work(tmp_path, capsys):
    assert main(["run", str(ROUND), "--output-dir", str(tmp_path), "rs.evaluators=[wrld]"]) == 2
    assert "unknown evaluator 'wrld'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
