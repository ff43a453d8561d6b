"""The reward_model stage on a tiny model: it learns a learnable preference, saves a checkpoint plain
transformers scores the same way, and bad data gives file:line:field errors, not tracebacks."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from align.cli import main
from align.config.recipe import recipe_from_dict
from align.runner import run_recipe, run_stage
from align.runtime import StageInputError
from rewards.scoring import RewardScorer
from tests.conftest import REPO

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
WORDS = ("apple river stone cloud tiger lemon piano rocket garden silver window candle forest button planet "
         "mirror ocean pepper castle winter summer yellow dragon marble").split()
STRENGTHS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def marker_records(n: int) -> list[dict]:
    """Learnable: the more of the answer is in capitals, the better (3 ranked responses)."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)] + " " + WORDS[(7 * i + 3) % len(WORDS)]
        rows.append({"prompt": [{"role": "user", "content": f"Request {i}: say {w}."}],
                     "responses": [w.upper(), w.title(), w], "strength": STRENGTHS[i % 4],
                     "domain": "safety" if i % 3 == 0 else "helpfulness"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rm_recipe(tmp_path, data_path, **stage) -> dict:
    train = {"batch_size": 8, "max_length": 96, "max_steps": 12, "report_to": [],
             "optim": {"lr": 5e-3, "warmup_ratio": 0.0}}
    train.update(stage.pop("train", {}))
    return {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": [{
        "name": "rm", "kind": "reward_model", "model": {"path": "builtin:tiny", "tiny": TINY},
        "data": {"paths": [str(data_path)], "eval_fraction": 0.25}, "train": train, **stage}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "prefs.jsonl", marker_records(64))
    (record,) = run_recipe(recipe_from_dict(rm_recipe(tmp, data)), log=lambda *_: None)
    return tmp, record


def test_loss_falls_and_accuracy_rises_above_chance(trained):
    _, record = trained
    m = record["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["rm_accuracy"] >= 0.8 > m["rm_accuracy_before"]
    for key in ("rm_accuracy/better", "rm_accuracy/domain=safety", "rm_top1_accuracy", "rm_mean_margin",
                "rm_accuracy/adjacent", "reward_std"):
        assert key in m
    assert m["eval_records"] == 16 and m["rm_num_pairs"] == 48
    assert m["rm_accuracy_length_baseline"] == 0.5  # the three responses of a record have one length


def test_checkpoint_scores_the_same_with_plain_transformers(trained):
    tmp, record = trained
    model_dir = record["artifacts"]["reward_model"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    rows = [json.loads(x) for x in open(tmp / "runs/t/round_1/rm/eval_scores.jsonl")]
    scorer = RewardScorer.from_pretrained(model_dir, device="cpu")
    assert scorer.stats.max_length == 96 and scorer.stats.count == 3 * (48 + 16)
    got = scorer.score([r["prompt"] for r in rows for _ in r["responses"]],
                       [x for r in rows for x in r["responses"]], batch_size=5)
    want = [s for r in rows for s in r["scores"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_eval_cli_prints_json_metrics(trained, tmp_path, capsys):
    tmp, record = trained
    rows = [json.loads(x) for x in open(tmp / "runs/t/round_1/rm/eval_scores.jsonl")]
    data = write_jsonl(tmp_path / "held_out.jsonl", [{k: r[k] for k in ("prompt", "responses", "strength", "domain")}
                                                     for r in rows])
    assert main(["eval", "reward-model", "--model", record["artifacts"]["reward_model"], "--data", str(data),
                 "--batch-size", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["rm_accuracy"] == pytest.approx(record["metrics"]["rm_accuracy"])
    assert metrics["rm_accuracy/domain=safety"] == pytest.approx(record["metrics"]["rm_accuracy/domain=safety"])


BAD_ROWS = [
    ({"prompt": "q", "responses": ["only one"]}, "field 'responses': must hold at least 2 responses"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "field 'rejected': must be a non-empty string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "strength": "much_better"}, "field 'strength': expected one of"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "field 'prompt': must end with a user turn"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=["one_response", "empty", "strength", "prompt_end"])
def test_bad_rows_name_file_line_and_field_in_the_eval_cli(tmp_path, capsys, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    assert main(["eval", "reward-model", "--model", str(tmp_path), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:2: {message}" in err and "Traceback" not in err


def test_bad_row_through_the_stage(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", marker_records(3) + [BAD_ROWS[0][0]])
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(yaml.safe_dump(rm_recipe(tmp_path, data)))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:4: field 'responses': must hold at least 2 responses" in err and "Traceback" not in err


def test_lora_with_margins_and_hygiene(tmp_path):
    rows = marker_records(32)
    for row in rows[::4]:  # significantly_better rows: the middle response near-identical to the best
        row["responses"][1] = row["responses"][0] + " ."
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe = rm_recipe(tmp_path, data, margin="llama2_large", min_strength="slightly_better",
                       dedup_threshold=0.75, centering_coef=0.01, train={"max_steps": 3},
                       model={"path": "builtin:tiny", "tiny": TINY, "lora": {"r": 2, "alpha": 4, "last_layers": 1}})
    (record,) = run_recipe(recipe_from_dict(recipe), log=lambda *_: None)
    m = record["metrics"]
    assert m["dropped_below_min_strength"] > 0 and m["dropped_near_duplicate_responses"] > 0
    assert m["trunk_layers"] == 1  # the frozen first layer ran once per record (align.models.trunk)
    model_dir = tmp_path / "runs/t/round_1/rm/model"
    assert (model_dir / "adapter" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # merged, head included
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the held-out scores the stage computed from the kept states are the merged model's own
    rows = [json.loads(x) for x in open(tmp_path / "runs/t/round_1/rm/eval_scores.jsonl")]
    got = RewardScorer.from_pretrained(model_dir, device="cpu").score(
        [r["prompt"] for r in rows for _ in r["responses"]], [x for r in rows for x in r["responses"]])
    torch.testing.assert_close(torch.tensor(got), torch.tensor([s for r in rows for s in r["scores"]]),
                               atol=1e-5, rtol=1e-5)


def test_identical_responses_are_dropped_with_a_warning_and_all_identical_is_an_input_error(tmp_path, capsys):
    same = [{"prompt": f"Same {i}?", "responses": ["Yes.", "Yes.", "No."]} for i in range(4)]
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_records(8) + same)
    recipe = rm_recipe(tmp_path, data, train={"max_steps": 1}, stats_records=0)
    m = run_stage(recipe_from_dict(recipe), "rm", 1, "fp").metrics  # in this process: its log is captured
    assert m["identical_pairs_dropped"] == 4 and m["truncated_responses"] == 0
    assert m["train_records"] + m["eval_records"] == 12 and "epochs_trained" in m
    out = capsys.readouterr().out
    assert "[rm] warning: dropped 4 of 36 ranked pairs whose two responses are identical" in out
    assert str(data) in out
    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "a"} for i in range(4)])
    recipe = rm_recipe(tmp_path, data, train={"max_steps": 1})
    with pytest.raises(StageInputError, match=r"no training pair left in .*same\.jsonl: the responses of each"):
        run_stage(recipe_from_dict(recipe), "rm", 1, "fp2")


@pytest.mark.slow
@pytest.mark.shared_data
def test_helpful_and_safety_models_on_real_data(shared_data, tmp_path):
    """The two stages of recipes/reward_models.yaml on a few hundred real records, a few steps each;
    then the Llama 2 combination of the two saved models."""
    from rewards.combine import CombinedReward

    def head(name, n):
        lines = (shared_data / name).read_text().splitlines()[:n]
        return write_jsonl(tmp_path / name, [json.loads(x) for x in lines])

    data = yaml.safe_load((REPO / "recipes" / "reward_models.yaml").read_text())
    data["output_dir"] = str(tmp_path / "runs")
    helpful, safety = data["stages"]
    helpful["data"]["paths"] = [str(head("prefs_helpful.train.jsonl", 160)), str(head("prefs_ranked.train.jsonl", 60))]
    safety["data"]["paths"] = [str(head("prefs_safety.train.jsonl", 160))]
    for stage in (helpful, safety):
        stage["model"]["tiny"] = TINY
        stage["data"]["eval_fraction"] = 0.2
        stage["stats_records"] = 8
        stage["train"].update(max_steps=3, max_length=128, batch_size=4, report_to=[])
    records = run_recipe(recipe_from_dict(data), log=lambda *_: None)
    m_help, m_safe = records[0]["metrics"], records[1]["metrics"]
    assert "rm_accuracy/significantly_better" in m_help and "rm_accuracy/domain=helpfulness" in m_help
    assert "rm_accuracy/domain=safety" in m_safe and 0 <= m_safe["rm_accuracy"] <= 1
    scorers = [RewardScorer.from_pretrained(r["artifacts"]["reward_model"], device="cpu") for r in records]
    rows = [json.loads(x) for x in open(tmp_path / "runs/reward_models/round_1/rm_safety/eval_scores.jsonl")][:4]
    out = CombinedReward(*scorers).score([r["prompt"] for r in rows], [r["responses"][0] for r in rows],
                                         is_safety=[True, False, False, False])
    assert out.used_safety[0] and len(out.reward) == 4
    assert out.safety[0] == pytest.approx(rows[0]["scores"][0], abs=1e-5)


@pytest.mark.slow  # two stages, each in its own process: ~10 s
def test_max_prompt_length_keeps_the_start_of_long_prompts(tmp_path):
    """Prompts of ~95 tokens at max_length 160: the default keeps their last 80 (cut), 120 keeps them
    whole; the scorer saved with the model (reward_stats.json) applies the same rule."""
    rows = marker_records(16)
    for r in rows:
        r["prompt"].insert(0, {"role": "system", "content": "Answer with the words only."})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe = rm_recipe(tmp_path, data, train={"max_steps": 1, "max_length": 160})
    recipe["stages"].append({**recipe["stages"][0], "name": "rm_long", "max_prompt_length": 120})
    by = {r["stage"]: r for r in run_recipe(recipe_from_dict(recipe), log=lambda *_: None)}
    assert by["rm"]["metrics"]["truncated_prompts"] == 16
    assert by["rm_long"]["metrics"]["truncated_prompts"] == 0
    long = RewardScorer.from_pretrained(by["rm_long"]["artifacts"]["reward_model"], device="cpu")
    short = RewardScorer.from_pretrained(by["rm"]["artifacts"]["reward_model"], device="cpu")
    prompt, response = rows[0]["prompt"], rows[0]["responses"][0]
    assert long.encode(prompt, response)[:1] == [long.tokenizer.bos_token_id]  # starts at <|begin_of_text|>
    assert len(short.encode(prompt, response)) < len(long.encode(prompt, response))


def test_train_sample_trains_on_that_many_records_of_the_same_split(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_records(40))
    recipe = rm_recipe(tmp_path, data, train={"max_steps": 1})
    recipe["stages"][0]["data"]["train_sample"] = 12
    (record,) = run_recipe(recipe_from_dict(recipe), log=lambda *_: None)
    m = record["metrics"]
    assert m["train_records"] == 12 and m["eval_records"] == 10
    # the held-out pairs by length order (the marker data's answers differ in case only: equal lengths)
    assert m["rm_pairs/shorter_wins"] == m["rm_pairs/longer_wins"] == 0
    assert 0 <= m["rm_length_baseline_accuracy/better"] <= 1
