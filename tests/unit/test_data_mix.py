"""Data mixtures (``data: {mix: [{paths: [...], weight: 0.9}, {builtin: ..., weight: 0.1}]}``): the parts'
shares hold exactly over the records a stage reads (so over every epoch), short parts repeat whole, and a
misplaced weight or part is refused before any work."""

import json

import pytest
from pydantic import ValidationError

from align.config.recipe import RecipeError, recipe_from_dict
from align.config.specs import DataSpec
from align.data.sources import load_preferences, mix_records


def test_shares_by_hand():
    a, b = list(range(100)), list(range(100, 110))
    out, counts = mix_records([a, b], [0.9, 0.1], seed=0)
    assert counts == [99, 11] and len(out) == 110  # 110 records: 99 and 11 (0.9 / 0.1 of 110)
    assert sum(x >= 100 for x in out) == 11 and len(set(x for x in out if x < 100)) == 99  # a: no repeats
    assert sorted(x for x in out if x >= 100) == sorted(b + [out[-1]])  # b: all 10, then one drawn again
    out2, counts2 = mix_records([a, b], [1, 1], seed=0)
    assert counts2 == [55, 55] and sum(x >= 100 for x in out2) == 55  # b repeated 5 times, 5 more drawn
    assert mix_records([a, b], [0.9, 0.1], seed=0) == (out, counts)
    assert mix_records([a, b], [0.9, 0.1], seed=1)[0] != out  # seeded


def _prefs(path, tag, n):
    rows = [{"prompt": [{"role": "user", "content": f"{tag} question {i}"}],
             "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}],
             "source": tag} for i in range(n)]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    return str(path)


def test_a_stage_reads_the_mix_at_its_weights(tmp_path):
    big, small = _prefs(tmp_path / "big.jsonl", "big", 300), _prefs(tmp_path / "small.jsonl", "small", 20)
    spec = DataSpec(mix=[{"paths": [big], "weight": 0.8}, {"paths": [small], "weight": 0.2}])
    records = load_preferences(spec, [], seed=0)
    assert len(records) == 320 and sum(r.source == "small" for r in records) == 64  # 0.2 of 320, within 2%: exact
    plain = load_preferences(DataSpec(paths=[big, small]), [big, small], seed=0)
    assert sum(r.source == "small" for r in plain) == 20  # without the mix: as the files are


def test_bad_mixes_are_refused():
    with pytest.raises(ValidationError, match=r"mix\[1\]: give its 'weight'"):
        DataSpec(mix=[{"paths": ["a"], "weight": 1}, {"paths": ["b"]}])
    with pytest.raises(ValidationError, match="give 'mix' alone"):
        DataSpec(paths=["a"], mix=[{"paths": ["b"], "weight": 1}])
    with pytest.raises(ValidationError, match="not a stage or another mix"):
        DataSpec(mix=[{"from": "rs", "weight": 1}])


def test_a_weight_outside_a_mix_is_refused():
    data = {"name": "t", "stages": [{"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny"},
                                     "data": {"builtin": "chat", "weight": 0.5}}]}
    with pytest.raises(RecipeError, match=r"stages\[sft\]\.data\.weight: only a part of a 'mix' has a weight"):
        recipe_from_dict(data)


def test_sft_and_prompt_readers_mix_too(tmp_path):
    from align.data.sources import load_prompts, load_sft

    spec = DataSpec(mix=[{"builtin": "chat", "builtin_size": 30, "weight": 2}, {"builtin": "world", "builtin_size": 30,
                                                                                  "weight": 1}])
    train, held = load_sft(spec, [], seed=0)
    assert len(train) + len(held) == 60
    prompts = load_prompts(DataSpec(mix=[{"builtin": "world", "builtin_size": 10, "weight": 3},
                                         {"builtin": "world_eval", "builtin_size": 10, "weight": 1}]), [], seed=0)
    assert len(prompts) == 20


def test_what_each_part_gave_is_counted_after_the_split(tmp_path):
    from align.data.sources import mix_counts, split_by_prompt

    big, small = _prefs(tmp_path / "big.jsonl", "big", 300), _prefs(tmp_path / "small.jsonl", "small", 20)
    records = load_preferences(DataSpec(mix=[{"paths": [big], "weight": 0.8}, {"paths": [small], "weight": 0.2}]),
                               [], seed=0)
    assert {r.meta["mix_part"] for r in records if r.source == "small"} == {1}
    train, held = split_by_prompt(records, 0.25, seed=0)
    counts = mix_counts(train)
    small_train = sum(r.source == "small" for r in train)
    assert counts == {"train_mix_part0_records": len(train) - small_train, "train_mix_part0_share": 1 - small_train / len(train),
                      "train_mix_part1_records": small_train, "train_mix_part1_share": small_train / len(train)}
    assert abs(counts["train_mix_part1_share"] - 0.2) < 0.05 and held
    assert mix_counts(load_preferences(DataSpec(paths=[big]), [big], seed=0)) == {}  # not mixed: nothing


def test_a_stage_reports_what_each_part_gave(tmp_path):
    from align.runner import run_recipe

    big, small = _prefs(tmp_path / "big.jsonl", "big", 40), _prefs(tmp_path / "small.jsonl", "small", 8)
    recipe = recipe_from_dict({"name": "t", "output_dir": str(tmp_path / "runs"), "stages": [{
        "name": "rm", "kind": "reward_model",
        "model": {"path": "builtin:tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "num_key_value_heads": 1}},
        "data": {"mix": [{"paths": [big], "weight": 0.5}, {"paths": [small], "weight": 0.5}]},
        "train": {"batch_size": 8, "max_steps": 1, "max_length": 64, "report_to": []}}]})
    (record,) = run_recipe(recipe, log=lambda *_: None)
    m = record["metrics"]
    assert m["train_mix_part0_records"] + m["train_mix_part1_records"] == m["train_records"]
    assert m["train_mix_part1_share"] == pytest.approx(0.5, abs=0.05)
