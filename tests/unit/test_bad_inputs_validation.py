"""Inputs that used to pass validation and fail (or do the wrong thing) once a stage started, now refused by
``align validate`` / ``align run`` before any work: one line naming the recipe field, exit code 2, no
traceback, nothing written.

- one tokenizer: a model that reads the policy's token ids (DPO / PPO / evaluation ``reference``, PPO's value
  model) has the policy's tokenizer; a policy is not named where a reward model is read, nor the reverse;
- checks that waited for the stage to start: model averaging's checkpoints, filters that leave no training
  record, GAtt's ``min_turns``, SFT answers that all have weight 0, data paths that are not files;
- the run folder: align writes only into a folder it made (its marker) or an empty one.

Each case starts from a folder of small model folders (config.json, a header-only safetensors file and
tokenizer files: nothing is loaded) and data files, and a recipe of one stage that uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.run_folders import RUN_MARKER, check_run_folder
from align.runtime import StageFailed, StageInputError

REPO = Path(__file__).resolve().parents[2]
ALIGN = Path(sys.executable).parent / "align"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
TRAIN = {"batch_size": 2, "max_length": 64, "max_steps": 1, "report_to": []}

# -- files -----------------------------------------------------------------------------------------------


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(q: str, a: str, weight: int | None = None) -> dict:
    answer = {"role": "assistant", "content": a} | ({"weight": weight} if weight is not None else {})
    return {"messages": [{"role": "user", "content": q}, answer]}


def pref(q: str, **extra) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], **extra}


def model(folder: Path, *, vocab: int = 100, eos: str = "<|eot_id|>", reward: bool = False,
          hidden: int = 32, weights: bool = True) -> str:
    """A model folder align's checks accept: config.json, a complete safetensors file, tokenizer files."""
    folder.mkdir(parents=True)
    arch = "LlamaForSequenceClassification" if reward else "LlamaForCausalLM"
    config = {"architectures": [arch], "hidden_size": hidden, "vocab_size": vocab, "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config | ({"id2label": {"0": "LABEL_0"}} if reward else {})))
    if weights:
        header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    tokens = {f"t{i}": i for i in range(vocab - 1)} | {eos: vocab - 1}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": tokens}, "added_tokens": []}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return str(folder)


class Files:
    """The models and data every case may use, made once per test in its own folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.policy = model(tmp / "policy")
        self.policy_copy = model(tmp / "policy_copy")  # the same tokenizer in another folder
        self.other = model(tmp / "other", vocab=120)  # another tokenizer
        self.other_eos = model(tmp / "other_eos", eos="</s>")
        self.rm = model(tmp / "rm", reward=True)
        self.rm_other = model(tmp / "rm_other", reward=True, vocab=120)
        self.wide = model(tmp / "wide", hidden=64)
        self.chats = jsonl(tmp / "chats.jsonl", [chat(f"q{i}", f"a{i}") for i in range(8)])
        self.prefs = jsonl(tmp / "prefs.jsonl", [pref(f"q{i}", strength="slightly_better") for i in range(8)])
        self.prompts = jsonl(tmp / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"q{i}"}]}
                                                     for i in range(8)])


# -- stages ----------------------------------------------------------------------------------------------


def tiny(**extra) -> dict:
    return {"path": "builtin:tiny", "tiny": TINY, **extra}


def dpo(f: Files, **extra) -> dict:
    return {"name": "dpo", "kind": "dpo", "model": {"path": f.policy}, "data": {"paths": [f.prefs]}, "train": TRAIN,
            **extra}


def ppo(f: Files, **extra) -> dict:
    return {"name": "ppo", "kind": "ppo", "model": {"path": f.policy}, "reward": {"model": {"path": f.rm}},
            "prompts": {"paths": [f.prompts]}, "rollout_batch_size": 4, "train": TRAIN, **extra}


def evaluate(f: Files, **extra) -> dict:
    return {"name": "eval", "kind": "evaluate", "model": {"path": f.policy}, **extra}


def sft(f: Files, **data) -> dict:
    return {"name": "sft", "kind": "sft", "model": tiny(), "data": {"paths": [f.chats], **data}, "train": TRAIN}


def reward_model(f: Files, data: dict | None = None, **extra) -> dict:
    return {"name": "rm", "kind": "reward_model", "model": tiny(), "data": data or {"paths": [f.prefs]},
            "train": TRAIN, **extra}


def gatt(f: Files, dialogues: dict, **extra) -> dict:
    return {"name": "gatt", "kind": "gatt", "model": tiny(), "dialogues": dialogues, **extra}


def average(*models: dict) -> dict:
    return {"name": "avg", "kind": "model_average", "models": list(models)}


# case -> (stages of the recipe, the field the one problem names, words of the message)
Case = tuple[Callable[[Files], list[dict]], str, str]
CASES: dict[str, Case] = {
    # -- one tokenizer ----------------------------------------------------------------------------------
    "DPO reference with another vocabulary": (
        lambda f: [dpo(f, reference={"path": f.other})], "stages[dpo].reference",
        "is not the policy's (stages[dpo].model"),
    "DPO reference with another end token": (
        lambda f: [dpo(f, reference={"path": f.other_eos})], "stages[dpo].reference", "end token '</s>' vs"),
    "DPO reference with another built-in tokenizer": (
        lambda f: [dpo(f, model=tiny(), reference=tiny(tokenizer="builtin:world"))], "stages[dpo].reference",
        "builtin:world vs builtin:bytes"),
    "DPO policy from a stage with another tokenizer": (
        lambda f: [sft(f) | {"model": tiny(tokenizer="builtin:world")},
                   dpo(f, model={"from": "sft"}, reference=tiny())], "stages[dpo].reference",
        "builtin:bytes vs builtin:world"),
    "PPO reference with another tokenizer": (
        lambda f: [ppo(f, reference={"path": f.other})], "stages[ppo].reference", "a vocabulary of 120 tokens vs 100"),
    "PPO value model with another tokenizer": (
        lambda f: [ppo(f, value_model={"path": f.rm_other})], "stages[ppo].value_model",
        "the value model reads the policy's token ids"),
    "PPO reward model the value model starts from, another tokenizer": (
        lambda f: [ppo(f, reward={"model": {"path": f.rm_other}})], "stages[ppo].reward.model",
        "value_model is not set"),
    "evaluation reference with another tokenizer": (
        lambda f: [evaluate(f, reference={"path": f.other})], "stages[eval].reference", "vocabulary of 120 tokens"),
    # -- the right kind of model ------------------------------------------------------------------------
    "a policy folder as PPO's reward model": (
        lambda f: [ppo(f, reward={"model": {"path": f.policy}}, value_model={"path": f.rm})],
        "stages[ppo].reward.model.path", "is a policy (LlamaForCausalLM), not a reward model"),
    "a policy folder as an evaluation reward model": (
        lambda f: [evaluate(f, reward_models={"helpful": {"path": f.policy}})],
        "stages[eval].reward_models.helpful.path", "not a reward model"),
    "the built-in model as a reward model": (
        lambda f: [ppo(f, reward={"model": tiny()}, value_model={"path": f.rm})], "stages[ppo].reward.model.path",
        "builtin:tiny is a policy"),
    "a reward model folder as DPO's policy": (
        lambda f: [dpo(f, model={"path": f.rm})], "stages[dpo].model.path",
        "is a reward model (LlamaForSequenceClassification), not a policy"),
    # -- model averaging --------------------------------------------------------------------------------
    "model average of a missing folder": (
        lambda f: [average({"path": f.policy}, {"path": str(f.tmp / "gone")})], "stages[avg].models[1].path",
        "no such folder"),
    "model average of a policy and a reward model": (
        lambda f: [average({"path": f.policy}, {"path": f.rm})], "stages[avg].models[1]",
        "a reward model cannot be averaged with a policy (stages[avg].models[0])"),
    "model average of two sizes": (
        lambda f: [average({"path": f.policy}, {"path": f.wide})], "stages[avg].models[1].path",
        "config.json 'hidden_size' is 64, stages[avg].models[0]'s is 32"),
    "model average of a stage's policy and a reward model folder": (
        lambda f: [sft(f), average({"from": "sft"}, {"path": f.rm})], "stages[avg].models[1]",
        "a reward model cannot be averaged with a policy"),
    "model average of a folder without safetensors": (
        lambda f: [average({"path": f.policy}, {"path": _bin_only(f)})], "stages[avg].models[1].path",
        "has no *.safetensors weights"),
    # -- filters that leave no training record ----------------------------------------------------------
    "reward model domain absent from its file": (
        lambda f: [reward_model(f, domain="safety")], "stages[rm].domain",
        "no record of " ),
    "reward model domain absent from a built-in set": (
        lambda f: [reward_model(f, {"builtin": "chat", "builtin_size": 100}, domain="safety")], "stages[rm].domain",
        "the built-in set 'chat'"),
    "reward model min_strength above every record": (
        lambda f: [reward_model(f, min_strength="better")], "stages[rm].min_strength",
        "drops every training record"),
    "SFT eval_fraction 0.999 on a file": (
        lambda f: [sft(f, eval_fraction=0.999)], "stages[sft].data.eval_fraction", "holds out every prompt"),
    "DPO eval_fraction 0.999 on a file": (
        lambda f: [dpo(f, data={"paths": [f.prefs], "eval_fraction": 0.999})], "stages[dpo].data.eval_fraction",
        "holds out every prompt"),
    "reward model eval_fraction 0.999 on a file": (
        lambda f: [reward_model(f, {"paths": [f.prefs], "eval_fraction": 0.999})], "stages[rm].data.eval_fraction",
        "no training record is left"),
    "SFT answers that all have weight 0": (
        lambda f: [sft(f) | {"data": {"paths": [jsonl(f.tmp / "w0.jsonl", [chat(f"q{i}", "a", 0) for i in range(4)])]}}],
        "stages[sft].data", "every assistant message has weight 0"),
    "GAtt min_turns above every dialogue of a file": (
        lambda f: [gatt(f, {"paths": [f.chats]}, min_turns=3)], "stages[gatt].min_turns",
        "more user turns than any dialogue"),
    "GAtt min_turns above every built-in dialogue": (
        lambda f: [gatt(f, {"builtin": "world_dialogues", "builtin_size": 100}, min_turns=13, max_turns=13)],
        "stages[gatt].min_turns", "(at most 12)"),
    # -- data paths that are not files ------------------------------------------------------------------
    "a data path that is a folder": (
        lambda f: [sft(f) | {"data": {"paths": [str(f.tmp / "policy")]}}], "stages[sft].data.paths[0]",
        "is a folder; name a JSONL file inside it"),
    "a data path that is /dev/null": (
        lambda f: [sft(f) | {"data": {"paths": [os.devnull]}}], "stages[sft].data.paths[0]",
        "is not a regular file"),
}


def _bin_only(f: Files) -> str:
    folder = Path(model(f.tmp / "bin_only", weights=False))
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    return str(folder)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_recipe(tmp: Path, stages: list[dict], name: str = "t") -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp / "runs"), "stages": stages}))
    return path


def problems_of(err: str) -> list[str]:
    return [line.removeprefix("  - ") for line in err.splitlines() if line.startswith("  - ")]


@pytest.mark.parametrize("case", list(CASES))
def test_refused_at_validation_with_one_line_naming_the_field(case, tmp_path, capsys):
    stages, field, words = CASES[case]
    recipe = write_recipe(tmp_path, stages(Files(tmp_path)))
    before = snapshot(tmp_path)

    code = main(["validate", str(recipe)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    problems = problems_of(err)
    assert len(problems) == 1, err
    assert problems[0].startswith(field + ":"), err
    assert words in problems[0], err
    assert snapshot(tmp_path) == before, "validation wrote or changed a file"


def test_the_same_inputs_done_right_are_accepted(tmp_path, capsys):
    """The counterpart of the cases: the same tokenizer in another folder, a reward model where one is read,
    models of one kind and size, filters that leave records, dialogues long enough."""
    f = Files(tmp_path)
    stages = [
        sft(f, eval_fraction=0.5),
        dpo(f, reference={"path": f.policy_copy}, data={"paths": [f.prefs], "eval_fraction": 0.5}),
        ppo(f, name="ppo", reference={"path": f.policy_copy}),
        evaluate(f, reference={"path": f.policy_copy}, reward_models={"helpful": {"path": f.rm}}),
        reward_model(f, domain="helpfulness", min_strength="slightly_better"),
        average({"path": f.policy}, {"path": f.policy_copy}),
        gatt(f, {"builtin": "world_dialogues", "builtin_size": 100}, min_turns=12, max_turns=12),
        # a large built-in set is drawn small first: its 58 prompts would all be held out, the 479 of the
        # whole set are not (the draw's problem is not confirmed)
        sft(f) | {"name": "sft_big", "data": {"builtin": "chat", "builtin_size": 1000, "eval_fraction": 0.995}},
    ]
    code = main(["validate", str(write_recipe(tmp_path, stages))])
    assert code == 0, capsys.readouterr().err


# -- the run folder --------------------------------------------------------------------------------------


def test_a_run_folder_holding_a_users_report_is_refused_and_left_as_it_was(tmp_path):
    recipe = write_recipe(tmp_path, [sft(Files(tmp_path))])
    run_dir = tmp_path / "runs/t"
    run_dir.mkdir(parents=True)
    (run_dir / "report.md").write_text("# my own notes\n")
    before = snapshot(tmp_path)

    done = subprocess.run([str(ALIGN), "run", str(recipe)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"run folder {run_dir} exists but align did not make it (no {RUN_MARKER}; it holds report.md)" in lines[0]
    assert snapshot(tmp_path) == before, "the refused run wrote or changed a file"


def test_the_command_line_refuses_a_bad_recipe_with_exit_code_2(tmp_path):
    f = Files(tmp_path)
    recipe = write_recipe(tmp_path, [dpo(f, reference={"path": f.other})])
    done = subprocess.run([str(ALIGN), "validate", str(recipe)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert problems_of(done.stderr) and problems_of(done.stderr)[0].startswith("stages[dpo].reference: ")


@pytest.mark.parametrize("made", ["marker", "stage folder of an earlier align", "empty", "absent"])
def test_a_run_folder_align_made_or_an_empty_one_is_accepted(tmp_path, made):
    run_dir = tmp_path / "runs/t"
    if made != "absent":
        run_dir.mkdir(parents=True)
    if made == "marker":
        (run_dir / RUN_MARKER).write_text(json.dumps({"made_by": "align"}))
        (run_dir / "report.md").write_text("# t\n")  # align's own report
    elif made == "stage folder of an earlier align":
        (run_dir / "round_1/sft").mkdir(parents=True)
        (run_dir / "round_1/sft/stage.json").write_text(json.dumps({"fingerprint": "x", "kind": "sft"}))
        (run_dir / "resolved.yaml").write_text("name: t\n")
    check_run_folder(run_dir)


def test_a_marker_of_someone_else_is_not_aligns(tmp_path):
    (tmp_path / RUN_MARKER).write_text(json.dumps({"made_by": "me"}))
    with pytest.raises(StageInputError, match="align did not make it"):
        check_run_folder(tmp_path)


def test_align_run_writes_its_marker_and_goes_on_into_the_folder_it_made(tmp_path, monkeypatch, capsys):
    """The first run marks the folder; a rerun into it passes the check and reaches its stage (the stage
    itself is replaced here: a user error at once), the user's file in an align folder left alone."""
    import align.runner

    def stage_reached(recipe_file, stage, round_, fp, work):
        raise StageFailed(stage.name, round_, "stage reached", user_error=True)

    monkeypatch.setattr(align.runner, "_run_child", stage_reached)
    recipe = write_recipe(tmp_path, [sft(Files(tmp_path))])
    for _ in range(2):
        assert main(["run", str(recipe)]) == 2
        assert "stage reached" in capsys.readouterr().err
    run_dir = tmp_path / "runs/t"
    assert json.loads((run_dir / RUN_MARKER).read_text()) == {"made_by": "align"}
    (run_dir / "notes.txt").write_text("mine")
    assert main(["run", str(recipe)]) == 2 and "stage reached" in capsys.readouterr().err
    assert (run_dir / "notes.txt").read_text() == "mine"
