"""The gatt stage on a tiny model: what the model is shown turn by turn, the records it writes, resuming
after a kill without redoing finished dialogues, and the sft stage training on the result."""

from __future__ import annotations

import json

import pytest

from align.config.recipe import recipe_from_dict
from align.generation.protocol import Sample
from align.runner import run_stage
from tests.conftest import run_in_one_process
from tests.integration.test_retention_eval import steady_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedGenerator:
    """Answers every prompt with 'A<turn>' and records the prompts; fails after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None):
        self.prompts: list[list[list[dict]]] = []
        self.fail_after = fail_after

    def sample(self, prompts, k, params):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.prompts.append(prompts)
        return [[Sample(text=f"A{sum(m['role'] == 'user' for m in p)}", token_ids=[], logps_sum=0.0,
                        finish_reason="stop")] * k
                for p in prompts]

    def close(self):
        pass


def gatt_recipe(model: str, **stage) -> dict:
    return {"name": "t", "seed": 0, "stages": [{
        "name": "gatt", "kind": "gatt", "model": {"path": model},
        "dialogues": {"builtin": "world_dialogues", "builtin_size": 10},
        "min_turns": 2, "max_turns": 4,
        "sampling": {"temperature": 0.7, "max_new_tokens": 4, "batch_size": 3},
        **stage,
    }]}


def run_scripted(tmp_path, monkeypatch, data, generator):
    import align.stages.gatt as gatt

    monkeypatch.setattr(gatt, "make_generator", lambda *a, **k: generator)
    recipe = recipe_from_dict({**data, "output_dir": str(tmp_path / "runs")})
    (tmp_path / "runs/t/round_1/gatt").mkdir(parents=True, exist_ok=True)
    return run_stage(recipe, "gatt", 1, "fp")


def records(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "runs/t/round_1/gatt/gatt.jsonl")]


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_the_model_sees_the_instruction_every_turn_the_record_only_in_the_first(tmp_path, monkeypatch, placement):
    tiny = steady_tiny(tmp_path / "tiny")
    generator = ScriptedGenerator()
    result = run_scripted(tmp_path, monkeypatch, gatt_recipe(tiny, placement=placement), generator)
    rows = records(tmp_path)
    assert result.metrics["records"] == len(rows) == result.metrics["dialogues"] > 0
    for row in rows:
        instruction, turns = row["meta"]["instruction"], row["meta"]["turns"]
        assert 2 <= turns <= 4
        msgs = row["messages"]
        if placement == "system":
            assert msgs[0] == {"role": "system", "content": instruction}
            msgs = msgs[1:]
        else:
            assert msgs[0]["content"].startswith(instruction + " ")
        assert sum(instruction in m["content"] for m in msgs) == (placement == "first_user")
        answers = [m for m in msgs if m["role"] == "assistant"]
        assert [a["content"] for a in answers] == [f"A{t}" for t in range(1, turns + 1)]  # answered in order
        assert [a.get("weight") for a in answers] == [0] * (turns - 1) + [None]
    # while answering, every user message carried the instruction and the dialogue so far
    from world.retention import training_instructions

    texts = sorted((t for t, _ in training_instructions()), key=len, reverse=True)
    for batch in generator.prompts:
        for prompt in batch:
            users = [m for m in prompt if m["role"] == "user"]
            instruction = next(t for t in texts if users[0]["content"].startswith(t + " "))
            assert all(u["content"].startswith(instruction + " ") for u in users)
            assert [m["content"] for m in prompt if m["role"] == "assistant"] == [f"A{t}" for t in range(1, len(users))]


def test_loss_on_all_trains_every_answer(tmp_path, monkeypatch):
    tiny = steady_tiny(tmp_path / "tiny")
    run_scripted(tmp_path, monkeypatch, gatt_recipe(tiny, loss_on="all"), ScriptedGenerator())
    assert all("weight" not in m for row in records(tmp_path) for m in row["messages"])


def test_a_killed_run_keeps_finished_dialogues(tmp_path, monkeypatch):
    tiny = steady_tiny(tmp_path / "tiny")
    data = gatt_recipe(tiny)
    with pytest.raises(KeyboardInterrupt):  # dies inside the second batch of dialogues
        run_scripted(tmp_path, monkeypatch, data, ScriptedGenerator(fail_after=5))
    store = [json.loads(line) for line in open(tmp_path / "runs/t/round_1/gatt/store.rank0.jsonl")]
    assert [row["batch"] for row in store] == [0]
    kept = sum(len(a) for a in store[0]["answers"])
    result = run_scripted(tmp_path, monkeypatch, data, ScriptedGenerator())
    m = result.metrics
    assert m["answers_generated"] + kept == round(m["dialogues"] * m["turns_mean"])  # batch 0 not redone
    resumed = records(tmp_path)
    (tmp_path / "runs").rename(tmp_path / "runs_resumed")
    run_scripted(tmp_path, monkeypatch, data, ScriptedGenerator())
    assert records(tmp_path) == resumed  # the same data as a run that was never killed


@pytest.mark.slow
def test_sft_trains_on_gatt_data_end_to_end(tmp_path):
    tiny = steady_tiny(tmp_path / "tiny")
    data = gatt_recipe(tiny, evaluators=["world"])
    data["stages"].append({
        "name": "sft_gatt", "kind": "sft", "model": {"path": tiny},
        "data": {"from": "gatt"},
        "train": {"batch_size": 2, "max_length": 512, "max_steps": 3, "report_to": [],
                  "optim": {"lr": 3e-3, "warmup_ratio": 0.0}},
    })
    results = run_in_one_process(data, tmp_path / "runs")
    gatt, sft = results
    assert 0.0 <= gatt["metrics"]["gold_instruction_following"] <= 1.0
    assert sft["metrics"]["steps"] == 3 and sft["metrics"]["train_loss_last"] < sft["metrics"]["train_loss_first"]


class WorldGenerator(ScriptedGenerator):
    """Answers the last user message right, following the instructions stated in it, except questions of
    the 'capital' family (answered wrongly)."""

    def sample(self, prompts, k, params):
        from world.retention import follow_all
        from world.tasks import find_instructions, parse_task

        self.prompts.append(prompts)
        out = []
        for p in prompts:
            text = p[-1]["content"]
            task = parse_task(text)
            answer = "I don't know." if task.family == "capital" else follow_all(find_instructions(text), task)
            out.append([Sample(text=answer, token_ids=[], logps_sum=0.0, finish_reason="stop")] * k)
        return out


def test_min_score_keeps_only_dialogues_whose_trained_answer_scores_enough(tmp_path, monkeypatch):
    from world.tasks import parse_task

    tiny = steady_tiny(tmp_path / "tiny")
    data = gatt_recipe(tiny, reward={"function": "gold"}, evaluators=["world"])
    data["stages"][0]["dialogues"]["builtin_size"] = 24
    every = run_scripted(tmp_path, monkeypatch, data, WorldGenerator()).metrics
    assert every["records"] == every["dialogues"] and every["dropped_below_min_score"] == 0
    (tmp_path / "runs").rename(tmp_path / "runs_every")
    data["stages"][0]["min_score"] = 1.0
    kept = run_scripted(tmp_path, monkeypatch, data, WorldGenerator()).metrics
    rows = records(tmp_path)
    last_family = [parse_task([m for m in r["messages"] if m["role"] == "user"][-1]["content"]).family for r in rows]
    assert rows and "capital" not in last_family
    assert kept["dropped_below_min_score"] == every["records"] - kept["records"] > 0
    assert 0 < every["gold_instruction_following"] <= 1.0


def test_loss_on_passing_trains_exactly_the_answers_that_score_enough(tmp_path, monkeypatch):
    from world.judge import judge

    tiny = steady_tiny(tmp_path / "tiny")
    data = gatt_recipe(tiny, reward={"function": "gold"}, min_score=1.0, loss_on="passing")
    data["stages"][0]["dialogues"]["builtin_size"] = 24
    m = run_scripted(tmp_path, monkeypatch, data, WorldGenerator()).metrics
    rows = records(tmp_path)
    trained = 0
    for row in rows:
        instruction = row["meta"]["instruction"]
        seen = []
        for msg in row["messages"]:
            if msg["role"] == "user":  # as the model saw it: the instruction before every user message
                seen.append({"role": "user", "content": msg["content"] if msg["content"].startswith(instruction)
                             else f"{instruction} {msg['content']}"})
            elif msg["role"] == "assistant":
                passes = judge(seen, msg["content"]).score >= 1.0
                assert msg.get("weight") == (None if passes else 0)
                trained += passes
                seen.append(msg)
    assert trained == m["trained_answers"] > 0 and any(m.get("weight") == 0 for r in rows for m in r["messages"])


class BestLastGenerator(ScriptedGenerator):
    """k samples per prompt: k-1 wrong answers, then the right one that follows the instructions."""

    def sample(self, prompts, k, params):
        from world.retention import follow_all
        from world.tasks import find_instructions, parse_task

        self.prompts.append(prompts)
        out = []
        for p in prompts:
            text = p[-1]["content"]
            right = follow_all(find_instructions(text), parse_task(text))
            texts = ["I don't know."] * (k - 1) + [right]
            out.append([Sample(text=t, token_ids=[], logps_sum=0.0, finish_reason="stop") for t in texts])
        return out


def test_k_samples_per_turn_keep_the_best_by_the_reward(tmp_path, monkeypatch):
    tiny = steady_tiny(tmp_path / "tiny")
    data = gatt_recipe(tiny, k=3, reward={"function": "gold"})
    run_scripted(tmp_path, monkeypatch, data, BestLastGenerator())
    from world.tasks import parse_task

    picked = []
    for r in records(tmp_path):
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        for user, answer in zip(msgs[::2], msgs[1::2], strict=True):
            if parse_task(user["content"]).spec.domain == "helpfulness":
                picked.append(answer["content"])
    assert picked and "I don't know." not in picked  # the reward's pick (the last sample), not the first
