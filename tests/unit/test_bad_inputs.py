"""Every input a user can get wrong gives one clear message naming the file (and line and field where there
is one) and exit code 2, before any work starts: no traceback, nothing written, nothing lost.

Each case starts from a valid two-stage recipe (SFT on a data file, then DPO on a preference file, next to a
finished earlier run of the same name) and breaks one thing: the recipe, an override, a data file, a model
folder, a launch setting or the run folder. ``align run`` must refuse it with the expected words and leave
every file under the test's folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from align.cli import main

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def pref(q: str, good: str, bad: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}


def jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def safetensors(path: Path, names: list[str], truncate: int = 0) -> None:
    """A valid safetensors file of 2x2 float32 tensors (``truncate``: bytes cut off the end)."""
    header = {n: {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * (i + 1)]}
              for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * 16 * len(names)
    path.write_bytes(blob[: len(blob) - truncate])


def model_folder(path: Path, *, config="{}", weights=True, truncate=0, tokenizer=True) -> str:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config)
    if weights:
        safetensors(path / "model.safetensors", ["model.layers.0.self_attn.q_proj.weight",
                                                  "model.layers.0.mlp.up_proj.weight"], truncate)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return str(path)


@dataclass
class Setup:
    tmp: Path
    recipe: dict
    overrides: list[str] = field(default_factory=list)
    recipe_text: str | None = None  # written as is instead of ``recipe``

    @property
    def sft(self) -> dict:
        return self.recipe["stages"][0]

    @property
    def dpo(self) -> dict:
        return self.recipe["stages"][1]


def base(tmp: Path) -> Setup:
    chats = jsonl(tmp / "chats.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(8)])
    prefs = jsonl(tmp / "prefs.jsonl", [pref(f"question {i}", "good", "bad") for i in range(8)])
    train = {"batch_size": 2, "max_length": 64, "max_steps": 1, "report_to": []}
    recipe = {
        "name": "t", "output_dir": str(tmp / "runs"),
        "stages": [
            {"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"paths": [chats]}, "train": train},
            {"name": "dpo", "kind": "dpo", "model": {"from": "sft"}, "data": {"paths": [prefs]}, "train": train},
        ],
    }
    return Setup(tmp, recipe)


def finished_run(tmp: Path) -> None:
    """What an earlier successful run left (its contents must survive every refused command)."""
    stage = tmp / "runs/t/round_1/sft"
    (stage / "model").mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"fingerprint": "earlier", "kind": "sft"}))
    (stage / "result.json").write_text(json.dumps({"fingerprint": "earlier", "artifacts": {"policy": "round_1/sft/model"},
                                                   "metrics": {}}))
    safetensors(stage / "model/model.safetensors", ["lm_head.weight"])
    (tmp / "runs/t/report.md").write_text("# t\n")
    (tmp / "runs/t/resolved.yaml").write_text("name: t\n")


def set_model(path_of: Callable[[Path], str], **extra) -> Callable[[Setup], None]:
    def apply(s: Setup) -> None:
        s.sft["model"] = {"path": path_of(s.tmp), **extra}
    return apply


def data_file(rows, stage="sft") -> Callable[[Setup], None]:
    def apply(s: Setup) -> None:
        s.recipe["stages"][0 if stage == "sft" else 1]["data"] = {"paths": [jsonl(s.tmp / "bad.jsonl", rows)]}
    return apply


def override(*items: str) -> Callable[[Setup], None]:
    def apply(s: Setup) -> None:
        s.overrides += list(items)
    return apply


def foreign_stage_folder(s: Setup) -> None:
    # a folder align did not make, where a stage that must run would write (the earlier run's sft is fine)
    folder = s.tmp / "runs/t/round_1/dpo"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")


def raw_recipe(text: str) -> Callable[[Setup], None]:
    def apply(s: Setup) -> None:
        s.recipe_text = text
    return apply


def accelerate_config(text: str | None) -> Callable[[Setup], None]:
    def apply(s: Setup) -> None:
        path = s.tmp / "acc.yaml"
        if text is not None:
            path.write_text(text)
        s.sft["launch"] = {"num_processes": 2, "accelerate_config": str(path)}
    return apply


CASES: dict[str, tuple[Callable[[Setup], None], str]] = {
    # -- the recipe file ------------------------------------------------------------------------------
    "yaml syntax": (raw_recipe("name: t\nstages: [\n"), "not valid YAML"),
    "top level not a mapping": (raw_recipe("- a\n- b\n"), "the top level must be a mapping"),
    "unknown top-level key": (lambda s: s.recipe.update(sedd=3), "sedd"),
    "no stages": (lambda s: s.recipe.update(stages=[]), "stages"),
    "unknown stage kind": (lambda s: s.sft.update(kind="sfft"), "sfft"),
    "stage without a name": (lambda s: s.sft.pop("name"), "name"),
    "duplicate stage names": (lambda s: s.dpo.update(name="sft"), "the name 'sft' is used by 2 stages"),
    "stage name with a slash": (lambda s: s.dpo.update(name="../dpo"), "stages"),
    "run name '..'": (lambda s: s.recipe.update(name=".."), "name"),
    "output_dir climbs out": (lambda s: s.recipe.update(output_dir="runs/../../x"), "climbs out with '..'"),
    "from an unknown stage": (lambda s: s.dpo.update(model={"from": "sfft"}),
                              "'sfft' is not an earlier stage (did you mean 'sft'?)"),
    "from a later stage": (lambda s: s.sft.update(model={"from": "dpo"}), "'dpo' is not an earlier stage"),
    "from a stage of the wrong kind": (lambda s: s.dpo.update(data={"from": "sft"}),
                                       "'sft' is a sft stage, which produces policy; expected preferences"),
    "in_rounds out of range": (lambda s: s.dpo.update(in_rounds=[3]), "in_rounds: [3] outside 1..1"),
    "unknown built-in data": (lambda s: s.sft.update(data={"builtin": "chatt"}), "unknown built-in"),
    "unknown setting in a stage": (lambda s: s.sft["train"].update(batchsize=2), "batchsize"),
    # -- overrides ----------------------------------------------------------------------------------
    "override without '='": (override("sft.train.lr"), "expected key=value"),
    "override of an unknown stage": (override("sftt.train.max_steps=2"), "no stage named 'sftt'"),
    "override of an unknown field": (override("sft.train.optim.lrr=1e-4"), "lrr"),
    "infinite learning rate": (override("sft.train.optim.lr=.inf"), "finite"),
    "NaN learning rate": (override("sft.train.optim.lr=.nan"), "finite"),
    "negative learning rate": (override("sft.train.optim.lr=-1"), "greater than 0"),
    "AdamW beta of 1.5": (override("sft.train.optim.betas=[0.9, 1.5]"), "betas"),
    "AdamW betas not a pair": (override("sft.train.optim.betas=[0.9]"), "betas"),
    "batch size 0": (override("sft.train.batch_size=0"), "batch_size"),
    "unknown precision": (override("sft.train.mixed_precision=fp8"), "mixed_precision"),
    "zero epochs": (override("sft.train.epochs=0"), "epochs"),
    "text where a number goes": (override("sft.train.max_length=long"), "max_length"),
    "seed not a number": (override("seed=abc"), "seed"),
    "zero processes": (override("sft.launch.num_processes=0"), "num_processes"),
    # -- data files ---------------------------------------------------------------------------------
    "data file missing": (lambda s: s.sft.update(data={"paths": [str(s.tmp / "nope.jsonl")]}), "file not found"),
    "data path is a folder": (lambda s: s.sft.update(data={"paths": [str(s.tmp)]}), "file not found"),
    "empty data file": (data_file([]), "has no sft records: it is empty"),
    "not JSON": (data_file(["{not json"]), "bad.jsonl:1"),
    "a chat without messages": (data_file([chat("a", "b"), {"text": "hi"}]), "bad.jsonl:2"),
    "an unknown role": (data_file([{"messages": [{"role": "robot", "content": "x"}]}]), "bad.jsonl:1: field"),
    "no assistant turn": (data_file([{"messages": [{"role": "user", "content": "x"}]}]), "bad.jsonl:1: field 'messages'"),
    "empty assistant turn": (data_file([chat("q", "")]), "bad.jsonl:1: field"),
    "preference without rejected": (data_file([{"prompt": "q", "chosen": "a"}], stage="dpo"), "bad.jsonl:1"),
    "preference content not text": (data_file([pref("q", "a", "b") | {"chosen": [{"role": "assistant", "content": 3}]}],
                                              stage="dpo"), "bad.jsonl:1: field 'chosen"),
    "every row bad with skip_bad_rows": (lambda s: (data_file([{"x": 1}, {"y": 2}])(s),
                                                    s.sft["data"].update(skip_bad_rows=True)),
                                         "all 2 rows are bad"),
    "invalid UTF-8": (lambda s: ((s.tmp / "bad.jsonl").write_bytes(b'{"messages": "\xff"}\n'),
                                 s.sft.update(data={"paths": [str(s.tmp / "bad.jsonl")]})), "invalid UTF-8"),
    "a file listed twice": (lambda s: s.sft["data"].update(paths=s.sft["data"]["paths"] * 2), "twice"),
    # -- model folders ------------------------------------------------------------------------------
    "model folder missing": (set_model(lambda t: str(t / "no_model")), "no such folder"),
    "model path neither folder nor hub id": (set_model(lambda t: "models/a/b"), "no such folder: models/a/b"),
    "model folder without config.json": (set_model(lambda t: model_folder(t / "m", config=None)),
                                         "has no config.json"),
    "config.json not JSON": (set_model(lambda t: model_folder(t / "m", config="{")), "config.json: not valid JSON"),
    "model folder without weights": (set_model(lambda t: model_folder(t / "m", weights=False)), "has no weights"),
    "truncated model.safetensors": (set_model(lambda t: model_folder(t / "m", truncate=5)),
                                    "model.safetensors: truncated"),
    "model folder without tokenizer": (set_model(lambda t: model_folder(t / "m", tokenizer=False)),
                                       "has no tokenizer"),
    "model path is a file": (set_model(lambda t: jsonl(t / "weights.jsonl", [])), "is a file, not a model folder"),
    "LoRA target missing from a model folder": (
        set_model(lambda t: model_folder(t / "m"), lora={"target_modules": ["q_proj", "qkv"]}),
        "'qkv' match no module"),
    "LoRA target missing from the built-in model": (
        set_model(lambda t: "builtin:tiny", lora={"target_modules": ["attn.c_attn"]}),
        "'attn.c_attn' match no module of builtin:tiny"),
    "tokenizer folder missing": (set_model(lambda t: model_folder(t / "m", tokenizer=False), tokenizer="/no/tok"),
                                 "tokenizer: no such folder"),
    # -- launch ---------------------------------------------------------------------------------------
    "accelerate config missing": (accelerate_config(None), "accelerate_config: file not found"),
    "accelerate config not YAML": (accelerate_config("a: [\n"), "is not valid YAML"),
    "accelerate config not a mapping": (accelerate_config("- 1\n"), "is not an accelerate config"),
    # -- the run folder -------------------------------------------------------------------------------
    "a stage folder align did not make": (foreign_stage_folder, "align did not make it"),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_table_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_clear_message(case, tmp_path, capsys):
    breaker, expected = CASES[case]
    setup = base(tmp_path)
    finished_run(tmp_path)
    breaker(setup)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(setup.recipe_text if setup.recipe_text is not None else yaml.safe_dump(setup.recipe))
    before = snapshot(tmp_path)

    code = main(["run", str(recipe_file), *setup.overrides])

    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("Error") == 0, err
    after = snapshot(tmp_path)
    lock_files = {"runs/t/.align.lock", "runs/t/.align.lock.json", "runs/t/resolved.running.yaml"}
    assert {k: v for k, v in after.items() if k not in lock_files} == before, "files were written or lost"
