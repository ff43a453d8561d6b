"""Data through Hugging Face ``datasets`` (``data: {hf: {path: ...}}``): Parquet files, ``save_to_disk`` folders
with splits, read into the same records as JSONL; a bad row named like a JSONL row, before any work."""

import json

import pytest

datasets = pytest.importorskip("datasets", reason="the hf data source needs datasets")

from align.config.recipe import RecipeError, recipe_from_dict  # noqa: E402
from align.config.specs import DataSpec  # noqa: E402
from align.data.sources import load_preferences, load_sft  # noqa: E402


def _rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(n)]


def test_parquet_and_saved_folder_read_like_jsonl(tmp_path):
    rows = _rows(12)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(map(json.dumps, rows)) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "saved"))
    want = load_preferences(DataSpec(paths=[str(jsonl)]), [str(jsonl)], seed=0)
    assert load_preferences(DataSpec(hf={"path": str(tmp_path / "p.parquet")}), [], seed=0) == want
    assert load_preferences(DataSpec(hf={"path": str(tmp_path / "saved"), "split": "test"}), [], seed=0) == want[8:]
    sft = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}] * 4)
    sft.to_parquet(str(tmp_path / "s.parquet"))
    train, _ = load_sft(DataSpec(hf={"path": str(tmp_path / "s.parquet")}), [], seed=0)
    assert len(train) == 4 and train[0].messages[-1].content == "hello"


def _recipe(hf: dict) -> dict:
    return {"name": "t", "stages": [{"name": "rm", "kind": "reward_model", "model": {"path": "builtin:tiny"},
                                     "data": {"hf": hf}}]}


def test_a_bad_row_is_named_before_any_work(tmp_path):
    rows = _rows(5)
    rows[3]["rejected"] = None  # a row without its rejected answer: row 4
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(RecipeError, match=r"stages\[rm\]\.data\.hf: .*x\.parquet\[split=train\]:4: .*rejected"):
        recipe_from_dict(_recipe({"path": str(tmp_path / "x.parquet")}))
    kept = load_preferences(DataSpec(hf={"path": str(tmp_path / "x.parquet")}, skip_bad_rows=True), [], seed=0)
    assert len(kept) == 4  # with skip_bad_rows the bad row is skipped (and counted in the log)
    datasets.Dataset.from_list(_rows(3)).save_to_disk(str(tmp_path / "one"))
    assert recipe_from_dict(_recipe({"path": str(tmp_path / "one")})).stages[0].data.hf.split == "train"


def test_unknown_file_type_and_split(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(RecipeError, match=r"unknown file type '\.txt'"):
        recipe_from_dict(_recipe({"path": str(tmp_path / "d.txt")}))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecipeError, match=r"no split 'dev' \(it has train\)"):
        recipe_from_dict(_recipe({"path": str(tmp_path / "dd"), "split": "dev"}))
